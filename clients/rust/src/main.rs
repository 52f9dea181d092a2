//! `discovery-watch`: follow the sidecar's peer set and print it as JSON lines (see `discovery_client::json`).
//!
//! ```text
//! discovery-watch [--target ADDR] [--selector S] [--group NAME=SELECTOR]... [--include-self] [--ready-only]
//!                 [--endpoint NS.COMPONENT.ENDPOINT] [--model NAME] [--max-backoff SECONDS]
//! ```
//!
//! stdout: one line per applied change. stderr: one JSON line per reconnect (`{"retrying": ...}`). Exits 0
//! on SIGINT/SIGTERM, 2 on bad arguments, 1 when the sidecar refuses the watch for good (a bad filter).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use discovery_client::api::{PeerFilter, PeerGroup};
use discovery_client::connect::{DEFAULT_TARGET, channel};
use discovery_client::json::update_line;
use discovery_client::watch::{PeerWatch, WatchEvent};
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};

const USAGE: &str = "usage: discovery-watch [--target ADDR] [--selector S] [--group NAME=SELECTOR]... \
[--include-self] [--ready-only] [--endpoint NS.COMPONENT.ENDPOINT] [--model NAME] [--max-backoff SECONDS]
  ADDR: host:port, http://host:port or unix:///path (default: $DISCOVERY_GRPC_LISTEN, else 127.0.0.1:50051)";

struct Options {
    target: String,
    filter: PeerFilter,
    max_backoff: Duration,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut options = Options {
        target: std::env::var("DISCOVERY_GRPC_LISTEN").unwrap_or_else(|_| DEFAULT_TARGET.to_string()),
        filter: PeerFilter::default(),
        max_backoff: Duration::from_secs(5),
    };
    while let Some(flag) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match flag.as_str() {
            "--target" => options.target = value("--target")?,
            "--selector" | "-l" => options.filter.selector = value("--selector")?,
            "--group" => {
                let group = value("--group")?;
                let (name, selector) = group
                    .split_once('=')
                    .ok_or_else(|| format!("--group {group}: expected NAME=SELECTOR"))?;
                options.filter.groups.push(PeerGroup {
                    name: name.into(),
                    selector: selector.into(),
                });
            }
            "--include-self" => options.filter.include_self = true,
            "--ready-only" => options.filter.ready_only = true,
            "--endpoint" => options.filter.endpoint = value("--endpoint")?,
            "--model" => options.filter.model = value("--model")?,
            "--max-backoff" => {
                let seconds = value("--max-backoff")?;
                let seconds: f64 = seconds
                    .parse()
                    .map_err(|_| format!("--max-backoff {seconds}: expected seconds"))?;
                options.max_backoff =
                    Duration::try_from_secs_f64(seconds).map_err(|e| format!("--max-backoff: {e}"))?;
            }
            "--help" | "-h" => return Err(String::new()), // not an error: main prints the usage and exits 0
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(options)
}

#[tokio::main]
async fn main() -> ExitCode {
    let options = match parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(problem) if problem.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(problem) => {
            eprintln!("discovery-watch: {problem}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let channel = match channel(&options.target) {
        Ok(channel) => channel,
        Err(error) => {
            eprintln!("discovery-watch: bad target {}: {error}", options.target);
            return ExitCode::from(2);
        }
    };
    let (Ok(mut interrupt), Ok(mut terminate)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        eprintln!("discovery-watch: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    let mut watch = PeerWatch::new(channel, options.filter, options.max_backoff);
    let mut stdout = std::io::stdout().lock();
    loop {
        let event = tokio::select! {
            event = watch.next() => event,
            _ = interrupt.recv() => return ExitCode::SUCCESS,
            _ = terminate.recv() => return ExitCode::SUCCESS,
        };
        match event {
            Ok(WatchEvent::Update(update)) => {
                let line = update_line(&update, watch.view().peers().len());
                // A closed stdout (the reader went away) ends the program, as for any filter in a pipe.
                if writeln!(stdout, "{line}").and_then(|()| stdout.flush()).is_err() {
                    return ExitCode::SUCCESS;
                }
            }
            Ok(WatchEvent::Retrying { error, delay }) => {
                let view = watch.view();
                let notice = json!({"retrying": {
                    "code": format!("{:?}", error.code()),
                    "message": error.message(),
                    "delay_ms": delay.as_millis() as u64,
                    "resume_history_id": view.history_id(),
                    "resume_revision": view.revision(),
                }});
                eprintln!("{notice}");
            }
            Err(error) => {
                eprintln!(
                    "discovery-watch: the sidecar at {} refused the watch: {:?}: {}",
                    options.target,
                    error.code(),
                    error.message()
                );
                return ExitCode::FAILURE;
            }
        }
    }
}
