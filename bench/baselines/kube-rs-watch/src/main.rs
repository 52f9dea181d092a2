//! kube-rs-watch: a benchmark baseline for peer discovery built the way Dynamo's and SGLang's Rust
//! discovery is built: `kube::runtime::watcher` streams fed through `kube::runtime::reflector` into a
//! reflector `Store`, one pipeline for EndpointSlices (label-selected) and one for
//! DynamoWorkerMetadata custom resources, both in a single namespace.
//!
//! Every event is written to stdout as one JSON line, flushed at once, stamped with the wall-clock
//! time (ns since the Unix epoch) at which the event came out of the watcher:
//!
//! ```text
//! {"t":..,"src":"endpointslices","type":"ADDED","name":"..","rv":"..","seq":null,"ready":["pod-a"],"count":null}
//! ```
//!
//! `Apply` becomes `MODIFIED` when the reflector store already held the object and `ADDED` otherwise;
//! `Delete` becomes `DELETED`. Objects of the initial (re)list are not printed one by one: when the
//! list completes (`InitDone`) one `SYNCED` line carries the store size in `count` (its `name` and
//! `rv` are empty strings). Diagnostics go to stderr. SIGTERM or SIGINT exits with status 0; a bad argument or an unusable
//! kubeconfig exits with status 2.

use std::fmt::Debug;
use std::hash::Hash;
use std::io::{ErrorKind, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, Lookup, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Config, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

const USAGE: &str =
    "usage: kube-rs-watch --kubeconfig PATH [--namespace NS] [--slice-selector SELECTOR]";

/// Command-line options.
struct Args {
    kubeconfig: String,
    namespace: String,
    slice_selector: String,
}

fn parse_args() -> Result<Args> {
    let mut kubeconfig = None;
    let mut namespace = String::from("default");
    let mut slice_selector = String::from("kubernetes.io/service-name=workers");
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let mut value = || -> Result<String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it
                    .next()
                    .ok_or_else(|| anyhow!("{flag} needs a value\n{USAGE}")),
            }
        };
        match flag.as_str() {
            "--kubeconfig" => kubeconfig = Some(value()?),
            "--namespace" => namespace = value()?,
            "--slice-selector" => slice_selector = value()?,
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let kubeconfig = kubeconfig.ok_or_else(|| anyhow!("--kubeconfig is required\n{USAGE}"))?;
    Ok(Args {
        kubeconfig,
        namespace,
        slice_selector,
    })
}

/// One output line. Field order is the documented key order.
#[derive(Serialize)]
struct Line<'a> {
    t: i64,
    src: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    name: &'a str,
    rv: &'a str,
    seq: Value,
    ready: Option<Vec<String>>,
    count: Option<usize>,
}

fn now_ns() -> i64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// Write one line and flush. A closed stdout (the harness went away) ends the process quietly.
fn emit(line: &Line<'_>) {
    let mut buf = serde_json::to_vec(line).expect("serialising an output line cannot fail");
    buf.push(b'\n');
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if let Err(err) = out.write_all(&buf).and_then(|()| out.flush()) {
        if err.kind() == ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("kube-rs-watch: writing stdout: {err}");
        std::process::exit(1);
    }
}

/// What each source contributes to an event line beyond name and resourceVersion.
trait Describe {
    /// `spec.data.seq` of a DynamoWorkerMetadata, when it is a number.
    fn seq(&self) -> Value {
        Value::Null
    }
    /// Names of the ready endpoints of an EndpointSlice; `None` for other kinds.
    fn ready(&self) -> Option<Vec<String>> {
        None
    }
}

impl Describe for EndpointSlice {
    fn ready(&self) -> Option<Vec<String>> {
        let names = self
            .endpoints
            .iter()
            .flatten()
            // "ready" absent means unknown, which consumers treat as ready: only an explicit false excludes.
            .filter(|ep| ep.conditions.as_ref().and_then(|c| c.ready) != Some(false))
            .filter_map(|ep| ep.target_ref.as_ref().and_then(|r| r.name.clone()))
            .collect();
        Some(names)
    }
}

impl Describe for DynamicObject {
    fn seq(&self) -> Value {
        match self.data.pointer("/spec/data/seq") {
            Some(v @ Value::Number(_)) => v.clone(),
            _ => Value::Null,
        }
    }
}

/// Run one watcher -> reflector pipeline forever, printing a line per event.
///
/// `reflector()` writes each event into the store before handing it on, so whether the object was
/// already known has to be read from the store just before that: an `inspect` between the watcher and
/// the reflector records it, and the line is printed once the reflector has applied the event.
async fn watch<K>(
    src: &'static str,
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    dyntype: <K as Resource>::DynamicType,
) where
    K: Resource + Lookup<DynamicType = <K as Resource>::DynamicType> + Describe,
    K: Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    <K as Resource>::DynamicType: Clone + Eq + Hash,
{
    let store = writer.as_reader();
    let known = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicI64::new(0));

    let probe_store = store.clone();
    let probe_known = known.clone();
    let probe_received = received.clone();
    let probe_dyntype = dyntype.clone();
    let events = watcher(api, config).inspect_ok(move |event| {
        probe_received.store(now_ns(), Ordering::Relaxed);
        if let watcher::Event::Apply(obj) = event {
            let key = obj.to_object_ref(probe_dyntype.clone());
            probe_known.store(probe_store.get(&key).is_some(), Ordering::Relaxed);
        }
    });
    let mut stream = std::pin::pin!(reflector::reflector(writer, events).default_backoff());

    while let Some(item) = stream.next().await {
        let event = match item {
            Ok(event) => event,
            Err(err) => {
                eprintln!("kube-rs-watch: {src} watch error (retrying with backoff): {err}");
                continue;
            }
        };
        let t = received.load(Ordering::Relaxed);
        let (kind, obj) = match &event {
            watcher::Event::Apply(obj) => {
                let kind = if known.load(Ordering::Relaxed) {
                    "MODIFIED"
                } else {
                    "ADDED"
                };
                (kind, obj)
            }
            watcher::Event::Delete(obj) => ("DELETED", obj),
            watcher::Event::InitDone => {
                let count = store.len();
                emit(&Line {
                    t,
                    src,
                    kind: "SYNCED",
                    name: "",
                    rv: "",
                    seq: Value::Null,
                    ready: None,
                    count: Some(count),
                });
                continue;
            }
            watcher::Event::Init | watcher::Event::InitApply(_) => continue,
        };
        let meta = obj.meta();
        emit(&Line {
            t,
            src,
            kind,
            name: meta.name.as_deref().unwrap_or(""),
            rv: meta.resource_version.as_deref().unwrap_or(""),
            seq: obj.seq(),
            ready: obj.ready(),
            count: None,
        });
    }
    eprintln!("kube-rs-watch: {src} watch stream ended");
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kube-rs-watch: {err:#}");
            ExitCode::from(2)
        }
    }
}

async fn run() -> Result<()> {
    let args = parse_args()?;

    // Handlers first, so a SIGTERM that arrives while connecting still means a clean exit.
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
    };
    tokio::pin!(shutdown);

    let kubeconfig = Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading kubeconfig {}", args.kubeconfig))?;
    let options = KubeConfigOptions::default();
    let config = tokio::select! {
        _ = &mut shutdown => return Ok(()),
        res = Config::from_custom_kubeconfig(kubeconfig, &options) => {
            res.context("building client config from kubeconfig")?
        }
    };
    let client = Client::try_from(config).context("creating Kubernetes client")?;

    // EndpointSlices of the worker Service(s), selected by label.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &args.namespace);
    let slice_cfg = watcher::Config::default().labels(&args.slice_selector);
    let slice_writer: Writer<EndpointSlice> = Writer::default();

    // DynamoWorkerMetadata, untyped: spec.data is opaque.
    let gvk = GroupVersionKind::gvk("nvidia.com", "v1alpha1", "DynamoWorkerMetadata");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "dynamoworkermetadatas");
    let metas: Api<DynamicObject> = Api::namespaced_with(client, &args.namespace, &ar);
    let meta_writer: Writer<DynamicObject> = Writer::new(ar.clone());

    let both = async {
        tokio::join!(
            watch("endpointslices", slices, slice_cfg, slice_writer, ()),
            watch(
                "dynamoworkermetadatas",
                metas,
                watcher::Config::default(),
                meta_writer,
                ar
            ),
        )
    };

    tokio::select! {
        _ = &mut shutdown => Ok(()),
        _ = both => Err(anyhow!("both watch streams ended")),
    }
}
