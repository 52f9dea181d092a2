package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/client-go/rest"
)

// syncBuffer is a bytes.Buffer safe to read while the emitter writes to it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) lines() []map[string]any {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(b.buf.String()), "\n") {
		if l == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			panic(fmt.Sprintf("bad output line %q: %v", l, err))
		}
		out = append(out, m)
	}
	return out
}

// fakeAPI serves the two collections. The metadata collection needs two pages; its first watch
// ends with a bookmark, the second fails with a 410 ERROR event, and after the relist the third
// delivers a MODIFIED event. The slice watch answers 410 at the HTTP level first, then one event.
type fakeAPI struct {
	mu      sync.Mutex
	lists   map[string]int
	watches map[string][]string // resourceVersion asked for, per resource
}

func (f *fakeAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	res := r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:]
	q := r.URL.Query()
	flusher := w.(http.Flusher)
	if q.Get("watch") != "1" {
		f.lists[res]++
		if res == "dynamoworkermetadatas" && q.Get("continue") == "" {
			fmt.Fprint(w, `{"metadata":{"resourceVersion":"","continue":"p2"},"items":[{"metadata":{"name":"a"}}]}`)
			return
		}
		if res == "endpointslices" && q.Get("labelSelector") != "kubernetes.io/service-name=workers" {
			http.Error(w, "missing selector", http.StatusBadRequest)
			return
		}
		fmt.Fprintf(w, `{"metadata":{"resourceVersion":"%d"},"items":[{"metadata":{"name":"b"}}]}`, 10*f.lists[res])
		return
	}
	f.watches[res] = append(f.watches[res], q.Get("resourceVersion"))
	n := len(f.watches[res])
	switch res {
	case "dynamoworkermetadatas":
		switch n {
		case 1:
			fmt.Fprintln(w, `{"type":"BOOKMARK","object":{"metadata":{"resourceVersion":"25"}}}`)
		case 2:
			fmt.Fprintln(w, `{"type":"ERROR","object":{"kind":"Status","code":410,"reason":"Expired","message":"too old"}}`)
		default:
			fmt.Fprintln(w, `{"type":"MODIFIED","object":{"metadata":{"name":"a","resourceVersion":"41"},"spec":{"data":{"seq":3,"x":{"y":[1,2]}}}}}`)
			flusher.Flush()
			f.mu.Unlock()
			<-r.Context().Done()
			f.mu.Lock()
		}
	case "endpointslices":
		if n == 1 {
			http.Error(w, `{"kind":"Status","code":410}`, http.StatusGone)
			return
		}
		fmt.Fprintln(w, `{"type":"ADDED","object":{"metadata":{"name":"s","resourceVersion":"22"},"endpoints":[`+
			`{"conditions":{"ready":true},"targetRef":{"name":"p1"}},`+
			`{"conditions":{"ready":false},"targetRef":{"name":"p2"}},`+
			`{"conditions":{},"targetRef":{"name":"p3"}}]}}`)
		flusher.Flush()
		f.mu.Unlock()
		<-r.Context().Done()
		f.mu.Lock()
	}
}

func TestRawModeListsWatchesAndRelistsOnGone(t *testing.T) {
	api := &fakeAPI{lists: map[string]int{}, watches: map[string][]string{}}
	srv := httptest.NewServer(api)
	defer srv.Close()
	out := &syncBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- runRawMode(ctx, &rest.Config{Host: srv.URL}, "ns", "kubernetes.io/service-name=workers", newEmitter(out))
	}()

	deadline := time.Now().Add(10 * time.Second)
	for len(out.lines()) < 4 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("runRawMode: %v", err)
	}

	bySrc := map[string][]map[string]any{}
	for _, l := range out.lines() {
		bySrc[l["src"].(string)] = append(bySrc[l["src"].(string)], l)
	}
	md := bySrc["dynamoworkermetadatas"]
	if len(md) != 2 || md[0]["type"] != "SYNCED" || md[0]["count"] != 2.0 || md[0]["seq"] != nil {
		t.Fatalf("metadata lines: %v", md)
	}
	if md[1]["type"] != "MODIFIED" || md[1]["name"] != "a" || md[1]["rv"] != "41" || md[1]["seq"] != 3.0 ||
		md[1]["ready"] != nil || md[1]["count"] != nil {
		t.Fatalf("metadata event: %v", md[1])
	}
	es := bySrc["endpointslices"]
	if len(es) != 2 || es[0]["type"] != "SYNCED" || es[0]["count"] != 1.0 || es[0]["rv"] != "10" {
		t.Fatalf("slice lines: %v", es)
	}
	if got := fmt.Sprint(es[1]["ready"]); es[1]["type"] != "ADDED" || got != "[p1 p3]" || es[1]["seq"] != nil {
		t.Fatalf("slice event: %v", es[1])
	}
	// The fake's list resourceVersion is 10 x the pages served so far: the metadata lists take two
	// pages (rv 20, then 40 after the 410 relist), the slice lists one (10, then 20). The bookmark
	// moved the metadata watch on to 25.
	if got := fmt.Sprint(api.watches["dynamoworkermetadatas"]); got != "[20 25 40]" {
		t.Fatalf("metadata watch resourceVersions: %s", got)
	}
	if got := fmt.Sprint(api.watches["endpointslices"]); got != "[10 20]" {
		t.Fatalf("slice watch resourceVersions: %s", got)
	}
}

func TestSeqOnlyWhenNumber(t *testing.T) {
	for in, want := range map[string]string{`12`: `12`, `-1.5`: `-1.5`, `"7"`: ``, `null`: ``, ``: ``, `{}`: ``} {
		if got := string(seqJSON(json.RawMessage(in))); got != want {
			t.Errorf("seqJSON(%q) = %q, want %q", in, got, want)
		}
	}
}
