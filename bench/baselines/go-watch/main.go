// Command go-watch is the Go baseline for the discovery benchmarks: it watches the two resources the
// sidecar cares about (EndpointSlices selected by a label selector, and DynamoWorkerMetadata custom
// resources) in one namespace, and prints one JSON line per event on stdout, flushed at once, so a
// harness can timestamp when each change reached a Go client.
//
// Two modes:
//
//	informer  the ordinary client-go way: a typed SharedInformerFactory for EndpointSlices and a
//	          dynamic shared informer for the custom resources (resync disabled), printing from the
//	          Add/Update/Delete handlers. This is what a Go controller would do.
//	raw       the floor: a paginated LIST then a streaming WATCH per resource over the authenticated
//	          http.Client from the kubeconfig, reading the stream line by line and decoding only the
//	          handful of fields that are printed. No cache, no typed objects, no informer machinery.
//
// Output (one object per line):
//
//	{"t":<unix ns at receipt>,"src":"endpointslices"|"dynamoworkermetadatas",
//	 "type":"ADDED"|"MODIFIED"|"DELETED"|"SYNCED","name":"...","rv":"...",
//	 "seq":<spec.data.seq or null>,"ready":[<targetRef names of ready endpoints>] or null,
//	 "count":<objects listed, SYNCED only, else null>}
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path"
	"sync"
	"syscall"
	"time"

	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
)

const (
	srcSlices   = "endpointslices"
	srcMetadata = "dynamoworkermetadatas"
	listPage    = 500
	userAgent   = "go-watch-bench"
)

var metadataGVR = schema.GroupVersionResource{Group: "nvidia.com", Version: "v1alpha1", Resource: srcMetadata}

// ---------------------------------------------------------------------------------------------
// Output

// record is one output line. Pointer and nil-slice fields encode as null when absent.
type record struct {
	T     int64           `json:"t"`
	Src   string          `json:"src"`
	Type  string          `json:"type"`
	Name  string          `json:"name"`
	RV    string          `json:"rv"`
	Seq   json.RawMessage `json:"seq"`
	Ready []string        `json:"ready"`
	Count *int            `json:"count"`
}

// emitter serialises records onto stdout, one line each, flushed before returning.
type emitter struct {
	mu  sync.Mutex
	out *bufio.Writer
	buf bytes.Buffer
}

func newEmitter(w io.Writer) *emitter {
	return &emitter{out: bufio.NewWriterSize(w, 64<<10)}
}

var nullJSON = json.RawMessage("null")

func (e *emitter) emit(r *record) {
	if r.Seq == nil {
		r.Seq = nullJSON
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.buf.Reset()
	enc := json.NewEncoder(&e.buf) // appends the trailing newline
	enc.SetEscapeHTML(false)
	if err := enc.Encode(r); err != nil {
		fmt.Fprintf(os.Stderr, "go-watch: encoding output: %v\n", err)
		return
	}
	_, _ = e.out.Write(e.buf.Bytes())
	if err := e.out.Flush(); err != nil {
		fmt.Fprintf(os.Stderr, "go-watch: writing output: %v\n", err)
	}
}

func (e *emitter) synced(t int64, src, rv string, count int) {
	e.emit(&record{T: t, Src: src, Type: "SYNCED", RV: rv, Count: &count})
}

// seqJSON keeps spec.data.seq only when it is a JSON number; anything else reads as null.
func seqJSON(raw json.RawMessage) json.RawMessage {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || !(raw[0] == '-' || (raw[0] >= '0' && raw[0] <= '9')) {
		return nil
	}
	return raw
}

// ---------------------------------------------------------------------------------------------
// Mode "raw": LIST + WATCH over plain HTTP, minimal decoding.

// objectMeta is shared by every decoded object; code/reason/message are only set on the Status
// object carried by a watch ERROR event, or on an error response body.
type objectMeta struct {
	Metadata struct {
		Name            string `json:"name"`
		ResourceVersion string `json:"resourceVersion"`
	} `json:"metadata"`
	Code    int    `json:"code"`
	Reason  string `json:"reason"`
	Message string `json:"message"`
}

func (m *objectMeta) meta() *objectMeta { return m }

type sliceView struct {
	objectMeta
	Endpoints []struct {
		Conditions struct {
			Ready *bool `json:"ready"`
		} `json:"conditions"`
		TargetRef *struct {
			Name string `json:"name"`
		} `json:"targetRef"`
	} `json:"endpoints"`
}

func (s *sliceView) fill(r *record) {
	ready := make([]string, 0, len(s.Endpoints))
	for _, ep := range s.Endpoints {
		if ep.Conditions.Ready != nil && !*ep.Conditions.Ready {
			continue
		}
		if ep.TargetRef != nil {
			ready = append(ready, ep.TargetRef.Name)
		}
	}
	r.Ready = ready
}

type metadataView struct {
	objectMeta
	Spec struct {
		Data struct {
			Seq json.RawMessage `json:"seq"`
		} `json:"data"`
	} `json:"spec"`
}

func (m *metadataView) fill(r *record) { r.Seq = seqJSON(m.Spec.Data.Seq) }

// view is a pointer to one of the small decode targets above.
type view[T any] interface {
	*T
	meta() *objectMeta
	fill(*record)
}

// listResponse is the part of a List response that the floor needs.
type listResponse struct {
	Metadata struct {
		ResourceVersion string `json:"resourceVersion"`
		Continue        string `json:"continue"`
	} `json:"metadata"`
	Items []struct{} `json:"items"`
}

type watchEvent[T any] struct {
	Type   string `json:"type"`
	Object T      `json:"object"`
}

// errGone means the resourceVersion we hold is too old: list again.
var errGone = errors.New("resource version too old (410 Gone)")

type rawSource struct {
	name     string
	client   *http.Client
	base     url.URL // collection URL, no query
	selector string
	out      *emitter
}

func (s *rawSource) url(q url.Values) string {
	if s.selector != "" {
		q.Set("labelSelector", s.selector)
	}
	u := s.base
	u.RawQuery = q.Encode()
	return u.String()
}

func (s *rawSource) get(ctx context.Context, q url.Values) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.url(q), nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", userAgent)
	return s.client.Do(req)
}

func statusError(resp *http.Response) error {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	var st objectMeta
	if json.Unmarshal(body, &st) == nil && st.Message != "" {
		return fmt.Errorf("HTTP %d: %s", resp.StatusCode, st.Message)
	}
	return fmt.Errorf("HTTP %d: %s", resp.StatusCode, bytes.TrimSpace(body))
}

// list pages through the collection and returns the list resourceVersion and the object count.
func (s *rawSource) list(ctx context.Context) (string, int, error) {
	count, cont := 0, ""
	for {
		q := url.Values{"limit": {fmt.Sprint(listPage)}}
		if cont != "" {
			q.Set("continue", cont)
		}
		resp, err := s.get(ctx, q)
		if err != nil {
			return "", 0, err
		}
		if resp.StatusCode != http.StatusOK {
			err := statusError(resp)
			resp.Body.Close()
			if resp.StatusCode == http.StatusGone {
				// The continue token expired mid-pagination: start the list over.
				count, cont = 0, ""
				continue
			}
			return "", 0, err
		}
		var page listResponse
		err = json.NewDecoder(resp.Body).Decode(&page)
		resp.Body.Close()
		if err != nil {
			return "", 0, fmt.Errorf("decoding list: %w", err)
		}
		count += len(page.Items)
		if page.Metadata.Continue == "" {
			return page.Metadata.ResourceVersion, count, nil
		}
		cont = page.Metadata.Continue
	}
}

// watch streams events from rv until the server closes the stream (returning the last seen
// resourceVersion), ctx ends, or the resourceVersion expires (errGone).
func watch[T any, PT view[T]](ctx context.Context, s *rawSource, rv string) (string, error) {
	q := url.Values{"watch": {"1"}, "allowWatchBookmarks": {"true"}, "resourceVersion": {rv}}
	resp, err := s.get(ctx, q)
	if err != nil {
		return rv, err
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusGone {
		return rv, errGone
	}
	if resp.StatusCode != http.StatusOK {
		return rv, statusError(resp)
	}
	reader := bufio.NewReaderSize(resp.Body, 64<<10)
	for {
		line, err := reader.ReadBytes('\n')
		received := time.Now().UnixNano()
		if len(bytes.TrimSpace(line)) > 0 {
			var ev watchEvent[T]
			if derr := json.Unmarshal(line, &ev); derr != nil {
				return rv, fmt.Errorf("decoding watch event: %w", derr)
			}
			obj := PT(&ev.Object)
			m := obj.meta()
			switch ev.Type {
			case "ADDED", "MODIFIED", "DELETED":
				rv = m.Metadata.ResourceVersion
				r := record{T: received, Src: s.name, Type: ev.Type, Name: m.Metadata.Name, RV: rv}
				obj.fill(&r)
				s.out.emit(&r)
			case "BOOKMARK":
				rv = m.Metadata.ResourceVersion
			case "ERROR":
				if m.Code == http.StatusGone || m.Reason == "Expired" || m.Reason == "Gone" {
					return rv, errGone
				}
				return rv, fmt.Errorf("watch error event: %d %s: %s", m.Code, m.Reason, m.Message)
			default:
				return rv, fmt.Errorf("unexpected watch event type %q", ev.Type)
			}
		}
		if err != nil {
			if err == io.EOF || ctx.Err() != nil {
				return rv, nil
			}
			return rv, err
		}
	}
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "go-watch: "+format+"\n", args...)
}

// sleep waits d or until ctx ends; it reports whether to carry on.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// runRaw lists, reports SYNCED once, then watches forever, re-watching from the last
// resourceVersion when a stream ends and relisting when that version has expired.
func runRaw[T any, PT view[T]](ctx context.Context, s *rawSource) {
	const backoff = time.Second
	first := true
	for ctx.Err() == nil {
		rv, count, err := s.list(ctx)
		if err != nil {
			if ctx.Err() == nil {
				logf("%s: list failed: %v; retrying in %v", s.name, err, backoff)
				sleep(ctx, backoff)
			}
			continue
		}
		if first {
			s.out.synced(time.Now().UnixNano(), s.name, rv, count)
			first = false
		} else {
			logf("%s: relisted %d objects at resourceVersion %s", s.name, count, rv)
		}
		for ctx.Err() == nil {
			rv, err = watch[T, PT](ctx, s, rv)
			if errors.Is(err, errGone) {
				logf("%s: %v; relisting", s.name, err)
				break
			}
			if err != nil && ctx.Err() == nil {
				logf("%s: watch failed: %v; rewatching from %s in %v", s.name, err, rv, backoff)
				if !sleep(ctx, backoff) {
					return
				}
			}
		}
	}
}

func runRawMode(ctx context.Context, config *rest.Config, namespace, selector string, out *emitter) error {
	client, err := rest.HTTPClientFor(config)
	if err != nil {
		return fmt.Errorf("building HTTP client: %w", err)
	}
	host, _, err := rest.DefaultServerUrlFor(config)
	if err != nil {
		return fmt.Errorf("server URL: %w", err)
	}
	collection := func(group, version, resource string) url.URL {
		u := *host
		u.RawQuery = ""
		u.Path = path.Join("/", host.Path, "apis", group, version, "namespaces", namespace, resource)
		return u
	}
	slices := &rawSource{
		name: srcSlices, client: client, selector: selector, out: out,
		base: collection("discovery.k8s.io", "v1", srcSlices),
	}
	metadata := &rawSource{
		name: srcMetadata, client: client, out: out,
		base: collection(metadataGVR.Group, metadataGVR.Version, metadataGVR.Resource),
	}
	var wg sync.WaitGroup
	wg.Go(func() { runRaw[sliceView](ctx, slices) })
	wg.Go(func() { runRaw[metadataView](ctx, metadata) })
	wg.Wait()
	return nil
}

// ---------------------------------------------------------------------------------------------
// Mode "informer": client-go shared informers, resync disabled.

// unwrapDeleted returns the last known object behind a tombstone.
func unwrapDeleted(obj any) any {
	if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		return tomb.Obj
	}
	return obj
}

func sliceRecord(t int64, kind string, obj any) *record {
	es, ok := unwrapDeleted(obj).(*discoveryv1.EndpointSlice)
	if !ok {
		return nil
	}
	ready := make([]string, 0, len(es.Endpoints))
	for _, ep := range es.Endpoints {
		if ep.Conditions.Ready != nil && !*ep.Conditions.Ready {
			continue
		}
		if ep.TargetRef != nil {
			ready = append(ready, ep.TargetRef.Name)
		}
	}
	return &record{T: t, Src: srcSlices, Type: kind, Name: es.Name, RV: es.ResourceVersion, Ready: ready}
}

func metadataRecord(t int64, kind string, obj any) *record {
	u, ok := unwrapDeleted(obj).(*unstructured.Unstructured)
	if !ok {
		return nil
	}
	r := &record{T: t, Src: srcMetadata, Type: kind, Name: u.GetName(), RV: u.GetResourceVersion()}
	if v, found, _ := unstructured.NestedFieldNoCopy(u.Object, "spec", "data", "seq"); found {
		switch v.(type) {
		case int64, float64, int, int32, json.Number:
			if b, err := json.Marshal(v); err == nil {
				r.Seq = b
			}
		}
	}
	return r
}

// handlers prints a line per callback, stamping the time before any conversion work.
func handlers(out *emitter, convert func(int64, string, any) *record) cache.ResourceEventHandlerFuncs {
	onEvent := func(kind string, obj any) {
		t := time.Now().UnixNano()
		if r := convert(t, kind, obj); r != nil {
			out.emit(r)
		}
	}
	return cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { onEvent("ADDED", obj) },
		UpdateFunc: func(_, obj any) { onEvent("MODIFIED", obj) },
		DeleteFunc: func(obj any) { onEvent("DELETED", obj) },
	}
}

func runInformerMode(ctx context.Context, config *rest.Config, namespace, selector string, out *emitter) error {
	typed, err := kubernetes.NewForConfig(config)
	if err != nil {
		return fmt.Errorf("typed client: %w", err)
	}
	dyn, err := dynamic.NewForConfig(config)
	if err != nil {
		return fmt.Errorf("dynamic client: %w", err)
	}
	typedFactory := informers.NewSharedInformerFactoryWithOptions(typed, 0,
		informers.WithNamespace(namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = selector }),
	)
	dynFactory := dynamicinformer.NewFilteredDynamicSharedInformerFactory(dyn, 0, namespace, nil)

	sliceInformer := typedFactory.Discovery().V1().EndpointSlices().Informer()
	metadataInformer := dynFactory.ForResource(metadataGVR).Informer()

	sliceReg, err := sliceInformer.AddEventHandler(handlers(out, sliceRecord))
	if err != nil {
		return err
	}
	metadataReg, err := metadataInformer.AddEventHandler(handlers(out, metadataRecord))
	if err != nil {
		return err
	}

	typedFactory.Start(ctx.Done())
	dynFactory.Start(ctx.Done())
	defer typedFactory.Shutdown()
	defer dynFactory.Shutdown()

	// One SYNCED line per source, as soon as that source's handler has been handed its initial list.
	// cache.WaitFor on the registration's DoneChecker is client-go's non-polling form of
	// cache.WaitForCacheSync(stop, informer.HasSynced, registration.HasSynced): the latter polls every
	// 100ms, which would put up to 100ms of noise on the SYNCED timestamp.
	var wg sync.WaitGroup
	for _, src := range []struct {
		name     string
		informer cache.SharedIndexInformer
		reg      cache.ResourceEventHandlerRegistration
	}{
		{srcSlices, sliceInformer, sliceReg},
		{srcMetadata, metadataInformer, metadataReg},
	} {
		wg.Go(func() {
			if !cache.WaitFor(ctx, "", src.informer.HasSyncedChecker(), src.reg.HasSyncedChecker()) {
				return
			}
			t := time.Now().UnixNano()
			out.synced(t, src.name, src.informer.LastSyncResourceVersion(), len(src.informer.GetStore().ListKeys()))
		})
	}
	wg.Wait()
	<-ctx.Done()
	return nil
}

// ---------------------------------------------------------------------------------------------

func main() {
	kubeconfig := flag.String("kubeconfig", "", "path to the kubeconfig (required)")
	namespace := flag.String("namespace", "default", "namespace to watch")
	selector := flag.String("slice-selector", "kubernetes.io/service-name=workers", "label selector for EndpointSlices")
	mode := flag.String("mode", "informer", "raw | informer")
	flag.Parse()

	if *kubeconfig == "" {
		fmt.Fprintln(os.Stderr, "go-watch: --kubeconfig is required")
		flag.Usage()
		os.Exit(2)
	}
	if *mode != "raw" && *mode != "informer" {
		fmt.Fprintf(os.Stderr, "go-watch: --mode must be raw or informer, not %q\n", *mode)
		os.Exit(2)
	}
	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		fmt.Fprintf(os.Stderr, "go-watch: loading kubeconfig: %v\n", err)
		os.Exit(1)
	}
	config.UserAgent = userAgent

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	out := newEmitter(os.Stdout)
	run := runInformerMode
	if *mode == "raw" {
		run = runRawMode
	}
	if err := run(ctx, config, *namespace, *selector, out); err != nil {
		fmt.Fprintf(os.Stderr, "go-watch: %v\n", err)
		os.Exit(1)
	}
}
