"""The pure core: no network, no threads, no clocks. Everything here is deterministic and unit-tested."""
