//! The appliance's links to its user VMs: one thread per VM keeps a link to its `vm-endpoint` up
//! (reconnecting with backoff), measures the round trip with a health request every few seconds,
//! refreshes the VM's info, and relays `vm.call`s. Heartbeats read [`VmLinks::statuses`].
//!
//! A changed VM list ([`VmLinks::configure`]) applies at once: links whose VM is gone or whose
//! address or secret changed stop, new ones start, the others keep their connection.

use crate::backoff::Backoff;
use crate::vm_endpoint::{Address, Stream};
use crate::{info, warn};
use kernex_protocol::vmlink::{
    self, codes, CallParams, CallResult, LinkError, LinkFault, Method, Outcome, Request, Response,
    Session, VmStatus,
};
use kernex_protocol::VmConfig;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Health requests this often; their round trip is the reported RTT.
const PING_EVERY: Duration = Duration::from_secs(3);
/// Info (hostname, OS, load…) refreshed this often.
const INFO_EVERY: Duration = Duration::from_secs(60);
/// A health answer later than this counts as the link being down.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
const CONNECT_WITHIN: Duration = Duration::from_secs(5);

/// A relayed call and where its answer goes.
struct CallJob {
    params: CallParams,
    reply: mpsc::Sender<Result<CallResult, LinkFault>>,
}

struct Link {
    config: VmConfig,
    status: Arc<Mutex<VmStatus>>,
    calls: mpsc::Sender<CallJob>,
    stop: Arc<AtomicBool>,
}

/// Handle to every link; cheap to clone.
#[derive(Clone, Default)]
pub struct VmLinks {
    links: Arc<Mutex<BTreeMap<String, Link>>>,
}

impl std::fmt::Debug for VmLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmLinks").finish_non_exhaustive()
    }
}

impl VmLinks {
    /// Makes the running links match `vms`.
    pub fn configure(&self, vms: &[VmConfig]) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.retain(|name, link| {
            let keep = vms.contains(&link.config);
            if !keep {
                info!("vm {name}: link stopped (removed or reconfigured)");
                link.stop.store(true, Ordering::SeqCst);
            }
            keep
        });
        for vm in vms {
            if links.contains_key(&vm.name) {
                continue;
            }
            let status = Arc::new(Mutex::new(VmStatus {
                name: vm.name.clone(),
                address: vm.address.clone(),
                state: "connecting".into(),
                ..VmStatus::default()
            }));
            let stop = Arc::new(AtomicBool::new(false));
            let (calls, jobs) = mpsc::channel();
            let worker = Worker {
                config: vm.clone(),
                status: status.clone(),
                stop: stop.clone(),
                jobs,
            };
            if let Err(e) = std::thread::Builder::new()
                .name(format!("vm-{}", vm.name))
                .spawn(move || worker.run())
            {
                warn!("vm {}: cannot start its link: {e}", vm.name);
                continue;
            }
            links.insert(
                vm.name.clone(),
                Link {
                    config: vm.clone(),
                    status,
                    calls,
                    stop,
                },
            );
        }
    }

    /// The state of every link, by name.
    pub fn statuses(&self) -> Vec<VmStatus> {
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links
            .values()
            .map(|l| l.status.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
    }

    /// Relays a call to `vm`; blocks until it answers, fails, or `params.timeout_ms` (plus a
    /// margin for the link) passed.
    pub fn call(&self, vm: &str, params: CallParams) -> Result<CallResult, LinkFault> {
        let (reply, answer) = mpsc::channel();
        let wait = Duration::from_millis(params.timeout_ms) + ANSWER_WITHIN;
        {
            let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
            let Some(link) = links.get(vm) else {
                let known: Vec<&str> = links.keys().map(String::as_str).collect();
                return Err(LinkFault::new(
                    codes::UNKNOWN_VM,
                    format!(
                        "no VM named `{vm}` on this appliance (known: {})",
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            };
            link.calls.send(CallJob { params, reply }).map_err(|_| {
                LinkFault::new(codes::VM_DOWN, format!("the link to `{vm}` stopped"))
            })?;
        }
        match answer.recv_timeout(wait) {
            Ok(result) => result,
            Err(_) => Err(LinkFault::new(
                codes::TIMEOUT,
                format!("`{vm}` did not answer within {wait:?}"),
            )),
        }
    }
}

struct Worker {
    config: VmConfig,
    status: Arc<Mutex<VmStatus>>,
    stop: Arc<AtomicBool>,
    jobs: mpsc::Receiver<CallJob>,
}

impl Worker {
    fn run(self) {
        let address: Address = match self.config.address.parse() {
            Ok(address) => address,
            Err(e) => {
                self.set(|s| {
                    s.state = "down".into();
                    s.error = Some(e.clone());
                });
                self.refuse_calls_until_stopped(&LinkFault::new(codes::VM_DOWN, e));
                return;
            }
        };
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(15));
        while !self.stop.load(Ordering::SeqCst) {
            let failure = match self.connect(&address) {
                Ok(session) => {
                    backoff.reset();
                    self.serve(session)
                }
                Err(e) => e,
            };
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let fault = LinkFault::new(
                failure.code(),
                format!("{}: {failure}", self.config.address),
            );
            let was_connected = self.status().connected;
            self.set(|s| {
                s.connected = false;
                s.state = if failure.code() == codes::AUTH_FAILED {
                    "auth-failed".into()
                } else {
                    "down".into()
                };
                s.rtt_ms = None;
                s.error = Some(fault.message.clone());
            });
            if was_connected {
                warn!("vm {}: link lost: {failure}", self.config.name);
            }
            // Calls made while the link is down fail at once with the reason.
            let pause = backoff.next_delay(None);
            let until = Instant::now() + pause;
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                if self.stop.load(Ordering::SeqCst) {
                    return;
                }
                match self.jobs.recv_timeout(left.min(Duration::from_millis(500))) {
                    Ok(job) => {
                        let _ = job.reply.send(Err(fault.clone()));
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        }
    }

    fn connect(&self, address: &Address) -> Result<Session<Stream>, LinkError> {
        let stream = Stream::connect(address, CONNECT_WITHIN)?;
        stream.set_timeout(Some(ANSWER_WITHIN))?;
        let session = vmlink::connect(stream, self.config.secret.as_bytes())?;
        info!("vm {}: linked at {}", self.config.name, self.config.address);
        Ok(session)
    }

    /// Runs a connected link until it fails or the worker is stopped.
    fn serve(&self, mut session: Session<Stream>) -> LinkError {
        let mut next_id = 0u64;
        let mut request = |session: &mut Session<Stream>, method: Method, timeout: Duration| {
            next_id += 1;
            let id = next_id;
            session.stream().set_timeout(Some(timeout))?;
            session.send(&Request { id, method })?;
            let response: Response = session.receive()?;
            if response.id != id {
                return Err(LinkError::Protocol(format!(
                    "answer {} to request {id}",
                    response.id
                )));
            }
            Ok(response.result)
        };
        let mut info_due = Instant::now();
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return LinkError::Protocol("stopped".into());
            }
            let started = Instant::now();
            match request(&mut session, Method::Health, ANSWER_WITHIN) {
                Ok(Outcome::Health { .. }) => {}
                Ok(other) => return LinkError::Protocol(format!("health answered {other:?}")),
                Err(e) => return e,
            }
            let rtt = started.elapsed();
            let info = if Instant::now() >= info_due {
                info_due = Instant::now() + INFO_EVERY;
                match request(&mut session, Method::Info, ANSWER_WITHIN) {
                    Ok(Outcome::Info(info)) => Some(info),
                    Ok(other) => return LinkError::Protocol(format!("info answered {other:?}")),
                    Err(e) => return e,
                }
            } else {
                None
            };
            self.set(|s| {
                s.connected = true;
                s.state = "connected".into();
                s.error = None;
                s.last_seen = Some(crate::client::unix_now());
                s.rtt_ms = Some((rtt.as_secs_f64() * 1e6).round() / 1e3);
                if info.is_some() {
                    s.info = info.clone();
                }
            });
            // Until the next ping: relay calls as they come.
            let until = Instant::now() + PING_EVERY;
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                let job = match self.jobs.recv_timeout(left) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        return LinkError::Protocol("stopped".into())
                    }
                };
                let timeout = Duration::from_millis(job.params.timeout_ms) + ANSWER_WITHIN;
                match request(&mut session, Method::Call(job.params), timeout) {
                    Ok(Outcome::Call(result)) => {
                        let _ = job.reply.send(Ok(result));
                    }
                    Ok(Outcome::Error(fault)) => {
                        let _ = job.reply.send(Err(fault));
                    }
                    Ok(other) => {
                        let _ = job.reply.send(Err(LinkFault::new(
                            codes::PROTOCOL,
                            format!("call answered {other:?}"),
                        )));
                    }
                    Err(e) => {
                        let _ = job.reply.send(Err(LinkFault::new(e.code(), e.to_string())));
                        return e;
                    }
                }
            }
        }
    }

    fn refuse_calls_until_stopped(&self, fault: &LinkFault) {
        while !self.stop.load(Ordering::SeqCst) {
            match self.jobs.recv_timeout(Duration::from_millis(500)) {
                Ok(job) => {
                    let _ = job.reply.send(Err(fault.clone()));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn status(&self) -> VmStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, change: impl FnOnce(&mut VmStatus)) {
        change(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }
}
