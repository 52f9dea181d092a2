"""What server-side apply stores for the registrar's spec.data (found on the real API server, see the module)."""

from __future__ import annotations

from sidecar.core.server_side_apply import emptied_paths, emptied_to_null, intermediate_form


class TestIntermediateForm:
    def test_an_object_emptied_by_the_manager_is_null_at_any_depth(self) -> None:
        before = {"endpoints": {"k": {"v": 1}}, "model_cards": {"m": {"card_json": {"x": {"y": 1}}}}}
        sent = {"endpoints": {}, "model_cards": {"m": {"card_json": {"x": {}}}}}
        assert intermediate_form(before, sent) == {"endpoints": None, "model_cards": {"m": {"card_json": {"x": None}}}}
        assert emptied_paths(before, sent) == ["spec.data.endpoints", "spec.data.model_cards.m.card_json.x"]

    def test_an_object_that_was_empty_or_absent_stays_empty(self) -> None:
        """The second apply of the same document (nothing removed any more) stores it as sent."""
        sent = {"endpoints": {}, "a": {"b": {}}, "n": None, "l": [], "e": ""}
        assert intermediate_form({"endpoints": {}}, sent) == sent
        assert intermediate_form({}, sent) == sent
        assert intermediate_form(sent, sent) == sent
        assert emptied_paths(sent, sent) == []

    def test_arrays_and_scalars_are_as_sent(self) -> None:
        assert intermediate_form({"w": [1, {"a": 1}]}, {"w": [1, {}]}) == {"w": [1, {}]}
        assert intermediate_form({"v": {"a": 1}}, {"v": 3}) == {"v": 3}


class TestEmptiedToNull:
    def test_null_where_an_empty_object_was_sent(self) -> None:
        assert emptied_to_null({"a": {"b": None}}, {"a": {"b": {}}})
        assert emptied_to_null({"a": None}, {"a": {}})

    def test_not_when_stored_as_sent_or_differing_otherwise(self) -> None:
        assert not emptied_to_null({"a": {"b": {}}}, {"a": {"b": {}}})
        assert not emptied_to_null({"a": 1.0}, {"a": 1})
        assert not emptied_to_null({"x": None}, {"a": {}}), "a key not stored at all is not this case"
