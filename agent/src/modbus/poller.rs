//! The async shell of the Modbus source: one task per TCP device and one per serial bus.

use super::config::{Parity, Transport};
use super::deadband::LastSent;
use super::plan::{Request, Table};
use super::DevicePlan;
use crate::buffer::{BufferHandle, NewReading};
use fieldlink_ops::backoff::Backoff;
use fieldlink_ops::metrics::{Counter, Gauge, Health, Registry};
use fieldlink_proto::{Quality, Value};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_modbus::client::{Context, Reader};
use tokio_modbus::slave::{Slave, SlaveContext};
use tokio_util::sync::CancellationToken;

/// Per-device metrics.
#[derive(Debug, Clone)]
struct DeviceMetrics {
    connected: Gauge,
    requests: Counter,
    readings: Counter,
    exceptions: Counter,
    transport_errors: Counter,
    skipped_ticks: Counter,
}

impl DeviceMetrics {
    fn new(r: &Registry, device: &str) -> Self {
        let l = [("device", device)];
        Self {
            connected: r.gauge(
                "fieldlink_modbus_connected",
                "1 while the device's connection is up.",
                &l,
            ),
            requests: r.counter(
                "fieldlink_modbus_requests_total",
                "Modbus read requests sent.",
                &l,
            ),
            readings: r.counter(
                "fieldlink_modbus_readings_total",
                "Readings produced (after deadband).",
                &l,
            ),
            exceptions: r.counter(
                "fieldlink_modbus_exceptions_total",
                "Modbus exception responses (points sent with quality bad).",
                &l,
            ),
            transport_errors: r.counter(
                "fieldlink_modbus_transport_errors_total",
                "Timeouts, resets and refused connections (reconnect with backoff).",
                &l,
            ),
            skipped_ticks: r.counter(
                "fieldlink_modbus_skipped_ticks_total",
                "Poll ticks skipped (late, or backing off after a fault).",
                &l,
            ),
        }
    }
}

/// A transport fault: the connection is dropped and re-established with backoff. Its kind decides what else the
/// bus does: wait for a serial line to fall silent, or reconnect a TCP device at once.
#[derive(Debug)]
struct Fault {
    kind: FaultKind,
    why: String,
}

/// What failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FaultKind {
    /// The connection or the port could not be made: nothing was sent.
    Connect,
    /// No answer in time: one may still be on its way.
    Timeout,
    /// The connection's I/O failed or a frame could not be read (reset, closed, checksum, header mismatch).
    Io,
    /// An answer of another length than asked: a late or foreign frame.
    Mismatch,
    /// A gateway's exception 0x0A/0x0B (the device behind it does not answer): a whole frame, nothing else coming.
    Gateway,
}

impl FaultKind {
    /// Whether a frame may still be arriving on the line after this fault (RTU: let it fall silent first).
    fn may_leave_a_frame(self) -> bool {
        matches!(self, Self::Timeout | Self::Io | Self::Mismatch)
    }
}

impl Fault {
    fn new(kind: FaultKind, why: impl Into<String>) -> Self {
        Self {
            kind,
            why: why.into(),
        }
    }
}

/// The next aligned tick of each poll group, on the wall clock (readings of one interval line up across devices
/// and restarts). Pure: every method takes the time.
#[derive(Debug)]
struct Schedule {
    /// `(device, group, interval ms, next tick ms)`.
    ticks: Vec<(usize, usize, i64, i64)>,
}

impl Schedule {
    fn new(devices: &[DevicePlan], now: i64) -> Self {
        let ticks = devices
            .iter()
            .enumerate()
            .flat_map(|(d, p)| {
                p.groups
                    .iter()
                    .enumerate()
                    .map(move |(g, grp)| (d, g, grp.interval_ms as i64))
            })
            .map(|(d, g, iv)| (d, g, iv, next_tick(now, iv)))
            .collect();
        Self { ticks }
    }

    /// The earliest due `(slot, at_ms)`. A tick more than its interval ahead of `now` was planned before the clock
    /// was stepped back (NTP correcting a gateway's clock, an operator setting it): it moves to its next tick after
    /// `now`. Before December 2026 it did not, and every group of the connection but the one being waited on
    /// stayed unpolled for the length of the step.
    fn next(&mut self, now: i64) -> Option<(usize, i64)> {
        for t in &mut self.ticks {
            if t.3 > now + t.2 {
                t.3 = next_tick(now, t.2);
            }
        }
        self.ticks
            .iter()
            .enumerate()
            .min_by_key(|(_, t)| t.3)
            .map(|(i, t)| (i, t.3))
    }

    /// Moves slot `i` to its next aligned tick after `now`; returns how many ticks were missed (a clock stepped
    /// forward counts the ticks it stepped over).
    fn advance(&mut self, i: usize, now: i64) -> u64 {
        let (_, _, iv, at) = &mut self.ticks[i];
        let next = next_tick(now, *iv);
        let missed = ((next - *at) / *iv - 1).max(0) as u64;
        *at = next;
        missed
    }
}

/// The first multiple of `interval_ms` after `now`.
fn next_tick(now: i64, interval_ms: i64) -> i64 {
    (now.div_euclid(interval_ms) + 1) * interval_ms
}

async fn read(
    ctx: &mut Context,
    r: &Request,
) -> Result<Result<Vec<u16>, tokio_modbus::ExceptionCode>, tokio_modbus::Error> {
    let bits = |v: Vec<bool>| v.into_iter().map(u16::from).collect::<Vec<u16>>();
    Ok(match r.table {
        Table::Coil => ctx.read_coils(r.start, r.count).await?.map(bits),
        Table::Discrete => ctx.read_discrete_inputs(r.start, r.count).await?.map(bits),
        Table::Holding => ctx.read_holding_registers(r.start, r.count).await?,
        Table::Input => ctx.read_input_registers(r.start, r.count).await?,
    })
}

/// What one poll of a group produced: the readings, and each point's deadband state once they are queued.
struct Polled {
    readings: Vec<NewReading>,
    last: Vec<(usize, LastSent)>,
}

/// Polls one group of one device: every request in turn. Exceptions become `bad` readings (and the point's
/// deadband state is forgotten: the next good value goes); a transport fault, an answer of another length than
/// asked (a late or foreign frame: RTU has no transaction id), or a gateway's exception that its target does not
/// answer ends the poll with nothing kept. The deadband states are the caller's to apply once the readings are
/// queued, so a poll that fails halfway forgets nothing it did not send.
async fn poll_group(
    ctx: &mut Context,
    plan: &DevicePlan,
    group: usize,
    last: &[LastSent],
    m: &DeviceMetrics,
) -> Result<Polled, Fault> {
    let timeout = Duration::from_millis(plan.cfg.timeout_ms);
    let mut out = Polled {
        readings: Vec::new(),
        last: Vec::new(),
    };
    for r in &plan.groups[group].requests {
        m.requests.inc();
        let res = tokio::time::timeout(timeout, read(ctx, r))
            .await
            .map_err(|_| {
                Fault::new(
                    FaultKind::Timeout,
                    format!("timeout after {} ms", plan.cfg.timeout_ms),
                )
            })?;
        let at = fieldlink_ops::unix_ms();
        match res {
            Err(e) => return Err(Fault::new(FaultKind::Io, e.to_string())),
            Ok(Err(exception)) if gateway_unreachable(exception) => {
                return Err(Fault::new(
                    FaultKind::Gateway,
                    format!("gateway: {exception}"),
                ));
            }
            Ok(Err(exception)) => {
                m.exceptions.inc();
                tracing::debug!(device = %plan.cfg.name, table = ?r.table, start = r.start, ?exception, "Modbus exception");
                for &(i, _) in &r.points {
                    out.readings.push(NewReading {
                        series: plan.points[i].series.clone(),
                        ts_ms: at,
                        value: Value::F64(f64::NAN),
                        quality: Quality::Bad,
                    });
                    out.last.push((i, LastSent::default()));
                }
            }
            // RTU only: over TCP the transaction id already ties an answer to its request, and a device that
            // answers short still delivers the points that fit (below).
            Ok(Ok(data))
                if plan.cfg.transport == Transport::Rtu && data.len() != usize::from(r.count) =>
            {
                return Err(Fault::new(
                    FaultKind::Mismatch,
                    format!(
                    "answer of {} values to a request of {} ({:?} at {}): a late or foreign frame",
                    data.len(),
                    r.count,
                    r.table,
                    r.start
                ),
                ));
            }
            Ok(Ok(data)) => {
                for &(i, off) in &r.points {
                    let p = &plan.points[i];
                    let (off, size) = (off as usize, p.size as usize);
                    let Some(regs) = data.get(off..off + size) else {
                        m.exceptions.inc();
                        continue;
                    };
                    let value = plan.value_from_registers(i, regs);
                    let rule = p.deadband.as_ref();
                    let numeric =
                        |f: f64| (last[i].numeric(rule, f, at), LastSent::sent_numeric(f, at));
                    let (send, sent) = match &value {
                        Value::Str(s) => (last[i].text(rule, s, at), LastSent::sent_text(s, at)),
                        Value::F64(f) => numeric(*f),
                        Value::I64(n) => numeric(*n as f64),
                        Value::Bool(b) => numeric(f64::from(u8::from(*b))),
                    };
                    if send {
                        out.readings.push(NewReading {
                            series: p.series.clone(),
                            ts_ms: at,
                            value,
                            quality: Quality::Good,
                        });
                        out.last.push((i, sent));
                    }
                }
            }
        }
    }
    m.readings.add(out.readings.len() as u64);
    Ok(out)
}

/// A gateway's exception saying the device behind it does not answer (0x0A path unavailable, 0x0B target failed
/// to respond): the device is unreachable, not a point refused.
fn gateway_unreachable(e: tokio_modbus::ExceptionCode) -> bool {
    matches!(
        e,
        tokio_modbus::ExceptionCode::GatewayPathUnavailable
            | tokio_modbus::ExceptionCode::GatewayTargetDevice
    )
}

/// Runs every configured device until `cancel` fires.
pub async fn run(
    devices: Vec<DevicePlan>,
    buffer: BufferHandle,
    registry: Registry,
    health: Health,
    cancel: CancellationToken,
) {
    let mut tasks = JoinSet::new();
    let mut buses: BTreeMap<String, Vec<DevicePlan>> = BTreeMap::new();
    for d in devices {
        match d.cfg.transport {
            Transport::Tcp => {
                tasks.spawn(bus(
                    vec![d],
                    buffer.clone(),
                    registry.clone(),
                    health.clone(),
                    cancel.clone(),
                ));
            }
            Transport::Rtu => buses
                .entry(d.cfg.port.clone().unwrap_or_default())
                .or_default()
                .push(d),
        }
    }
    for (_, devs) in buses {
        tasks.spawn(bus(
            devs,
            buffer.clone(),
            registry.clone(),
            health.clone(),
            cancel.clone(),
        ));
    }
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            // A bus task that panicked polls nothing more: say so (its devices' health stays as last set).
            tracing::error!(error = %e, "a Modbus bus task ended abnormally");
        }
    }
}

/// Connects one TCP device, or opens a serial port and attaches the first device's unit id.
async fn connect(plan: &DevicePlan) -> Result<Context, Fault> {
    let cfg = &plan.cfg;
    let timeout = Duration::from_millis(cfg.timeout_ms);
    match cfg.transport {
        Transport::Tcp => {
            let address = cfg.address.clone().unwrap_or_default();
            let addr = tokio::time::timeout(timeout, tokio::net::lookup_host(&address))
                .await
                .map_err(|_| {
                    Fault::new(FaultKind::Connect, format!("resolving {address}: timeout"))
                })?
                .map_err(|e| Fault::new(FaultKind::Connect, format!("resolving {address}: {e}")))?
                .next()
                .ok_or_else(|| {
                    Fault::new(FaultKind::Connect, format!("{address} resolves to nothing"))
                })?;
            tokio::time::timeout(
                timeout,
                tokio_modbus::client::tcp::connect_slave(addr, Slave(cfg.unit_id)),
            )
            .await
            .map_err(|_| Fault::new(FaultKind::Connect, format!("connect to {address}: timeout")))?
            .map_err(|e| Fault::new(FaultKind::Connect, format!("connect to {address}: {e}")))
        }
        Transport::Rtu => {
            let port = cfg.port.clone().unwrap_or_default();
            let builder = tokio_serial::new(&port, cfg.baud)
                .parity(match cfg.parity {
                    Parity::None => tokio_serial::Parity::None,
                    Parity::Even => tokio_serial::Parity::Even,
                    Parity::Odd => tokio_serial::Parity::Odd,
                })
                .data_bits(if cfg.data_bits == 7 {
                    tokio_serial::DataBits::Seven
                } else {
                    tokio_serial::DataBits::Eight
                })
                .stop_bits(if cfg.stop_bits == 2 {
                    tokio_serial::StopBits::Two
                } else {
                    tokio_serial::StopBits::One
                });
            let stream = tokio_serial::SerialStream::open(&builder)
                .map_err(|e| Fault::new(FaultKind::Connect, format!("opening {port}: {e}")))?;
            // Whatever arrived before this request is not its answer.
            tokio_serial::SerialPort::clear(&stream, tokio_serial::ClearBuffer::Input).map_err(
                |e| Fault::new(FaultKind::Connect, format!("clearing {port}'s input: {e}")),
            )?;
            Ok(tokio_modbus::client::rtu::attach_slave(
                stream,
                Slave(cfg.unit_id),
            ))
        }
    }
}

/// `work`'s output, or `None` once the agent is stopping: a stop waits neither for a device's timeout nor for room
/// in a full buffer queue. What is dropped so was never committed: a poll not made, readings not queued. Work that
/// can finish at once finishes first.
async fn unless_stopped<T>(
    cancel: &CancellationToken,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        biased;
        v = work => Some(v),
        () = cancel.cancelled() => None,
    }
}

/// One connection (a TCP device, or a serial bus shared by its devices, one request at a time). Each device has
/// its own backoff: a dead device on a bus costs the bus its timeouts, and then only its retries.
async fn bus(
    devices: Vec<DevicePlan>,
    buffer: BufferHandle,
    registry: Registry,
    health: Health,
    cancel: CancellationToken,
) {
    let metrics: Vec<DeviceMetrics> = devices
        .iter()
        .map(|d| DeviceMetrics::new(&registry, &d.cfg.name))
        .collect();
    let mut last: Vec<Vec<LastSent>> = devices
        .iter()
        .map(|d| vec![LastSent::default(); d.points.len()])
        .collect();
    let mut backoff: Vec<Backoff> = devices
        .iter()
        .map(|_| Backoff::new(Duration::from_millis(500), Duration::from_secs(30)))
        .collect();
    let mut retry_at: Vec<Option<Instant>> = vec![None; devices.len()];
    let mut sched = Schedule::new(&devices, fieldlink_ops::unix_ms());
    let mut ctx: Option<Context> = None;
    let shared = devices.len() > 1
        || devices
            .first()
            .is_some_and(|d| d.cfg.transport == Transport::Rtu);
    for d in &devices {
        health.set(&format!("modbus:{}", d.cfg.name), false, "not polled yet");
    }
    loop {
        let now = fieldlink_ops::unix_ms();
        let Some((slot, at)) = sched.next(now) else {
            return;
        };
        let wait = Duration::from_millis((at - now).max(0) as u64);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let (d, g, _, _) = sched.ticks[slot];
        let missed = sched.advance(slot, fieldlink_ops::unix_ms());
        let (plan, m) = (&devices[d], &metrics[d]);
        m.skipped_ticks.add(missed);
        if retry_at[d].is_some_and(|t| Instant::now() < t) {
            m.skipped_ticks.inc();
            continue;
        }
        // A TCP connection that failed with an I/O error after idling (a device or a firewall closing idle
        // connections: the next request meets a reset) is connected again at once and polled once more, rather
        // than costing the poll; a fresh connection's fault counts.
        let mut polled = None;
        for attempt in 0..2 {
            let fresh = ctx.is_none();
            if ctx.is_none() {
                let Some(connected) = unless_stopped(&cancel, connect(plan)).await else {
                    return;
                };
                match connected {
                    Ok(c) => ctx = Some(c),
                    Err(fault) => {
                        polled = Some(Err(fault));
                        break;
                    }
                }
            }
            let Some(c) = ctx.as_mut() else { break };
            if shared {
                c.set_slave(Slave(plan.cfg.unit_id));
            }
            let Some(result) = unless_stopped(&cancel, poll_group(c, plan, g, &last[d], m)).await
            else {
                return;
            };
            let retry = attempt == 0
                && !fresh
                && plan.cfg.transport == Transport::Tcp
                && matches!(&result, Err(f) if f.kind == FaultKind::Io);
            polled = Some(result);
            if !retry {
                break;
            }
            tracing::debug!(device = %plan.cfg.name, "Modbus connection lost while idle; reconnecting at once");
            ctx = None;
        }
        let Some(polled) = polled else { continue };
        match polled {
            Ok(Polled {
                readings,
                last: sent,
            }) => {
                backoff[d].reset();
                retry_at[d] = None;
                m.connected.set(1);
                health.set(&format!("modbus:{}", plan.cfg.name), true, "");
                // The append waits while the buffer's queue is full (intake paused: the cap under `backpressure`,
                // disk space, a commit being retried).
                if !readings.is_empty()
                    && !matches!(
                        unless_stopped(&cancel, buffer.append(readings, None)).await,
                        Some(Ok(()))
                    )
                {
                    return;
                }
                for (i, state) in sent {
                    last[d][i] = state;
                }
            }
            Err(fault) => {
                fail(
                    plan,
                    m,
                    &health,
                    &mut backoff[d],
                    &mut retry_at[d],
                    &fault.why,
                );
                // Reconnect. On a serial line, first let it fall silent: a late answer still on its way would
                // otherwise be read as the answer to the next request (RTU frames carry no transaction id); the
                // port is then reopened with its input discarded.
                ctx = None;
                if plan.cfg.transport == Transport::Rtu
                    && fault.kind.may_leave_a_frame()
                    && unless_stopped(&cancel, tokio::time::sleep(quiet_after_fault(plan)))
                        .await
                        .is_none()
                {
                    return;
                }
            }
        }
    }
}

/// How long a serial line is left silent after a fault before its port is reopened: the device's timeout (a late
/// answer comes within about that), at most 2 s.
fn quiet_after_fault(plan: &DevicePlan) -> Duration {
    Duration::from_millis(plan.cfg.timeout_ms.min(2000))
}

fn fail(
    plan: &DevicePlan,
    m: &DeviceMetrics,
    health: &Health,
    backoff: &mut Backoff,
    retry_at: &mut Option<Instant>,
    why: &str,
) {
    m.transport_errors.inc();
    m.connected.set(0);
    let delay = backoff.next_delay().max(Duration::from_millis(100));
    *retry_at = Some(Instant::now() + delay);
    health.set(&format!("modbus:{}", plan.cfg.name), false, why);
    tracing::warn!(device = %plan.cfg.name, error = %why, retry_in_ms = delay.as_millis() as u64, "Modbus device unreachable");
}

#[cfg(test)]
mod tests {
    use super::{gateway_unreachable, FaultKind, Schedule};
    use tokio_modbus::ExceptionCode;

    #[test]
    fn only_faults_after_a_request_went_out_can_leave_a_frame_on_the_line() {
        for kind in [FaultKind::Timeout, FaultKind::Io, FaultKind::Mismatch] {
            assert!(kind.may_leave_a_frame(), "{kind:?}");
        }
        // A port that could not be opened sent nothing; a gateway's exception is a whole frame.
        for kind in [FaultKind::Connect, FaultKind::Gateway] {
            assert!(!kind.may_leave_a_frame(), "{kind:?}");
        }
    }

    #[test]
    fn only_a_gateways_unreachable_target_is_a_fault() {
        assert!(gateway_unreachable(ExceptionCode::GatewayPathUnavailable));
        assert!(gateway_unreachable(ExceptionCode::GatewayTargetDevice));
        for e in [
            ExceptionCode::IllegalDataAddress,
            ExceptionCode::IllegalFunction,
            ExceptionCode::ServerDeviceBusy,
            ExceptionCode::ServerDeviceFailure,
        ] {
            assert!(!gateway_unreachable(e), "{e:?}");
        }
    }

    /// Runs the bus loop's schedule for `ms` of monotonic time from wall time `now`: wait for the next tick,
    /// advance it. Returns the polls per slot, the skipped ticks and the wall time at the end.
    fn run_for(sched: &mut Schedule, mut now: i64, ms: i64) -> (Vec<u32>, u64, i64) {
        let (mut polls, mut skipped) = (vec![0; sched.ticks.len()], 0);
        let mut elapsed = 0;
        loop {
            let (slot, at) = sched.next(now).unwrap();
            let wait = (at - now).max(0);
            assert!(wait <= sched.ticks[slot].2, "a wait of {wait} ms");
            if elapsed + wait > ms {
                return (polls, skipped, now);
            }
            (now, elapsed) = (now + wait, elapsed + wait);
            skipped += sched.advance(slot, now);
            polls[slot] += 1;
        }
    }

    fn two_groups(now: i64) -> Schedule {
        Schedule {
            ticks: vec![
                (0, 0, 1000, super::next_tick(now, 1000)),
                (0, 1, 3000, super::next_tick(now, 3000)),
            ],
        }
    }

    #[test]
    fn every_group_keeps_its_interval_when_the_clock_is_stepped_back() {
        // From 500 ms past a second: 9 s hold 9 ticks of 1 s and 3 of 3 s.
        let start = 1_796_000_000_500;
        let mut sched = two_groups(start);
        let (polls, skipped, now) = run_for(&mut sched, start, 9_000);
        assert_eq!((polls, skipped), (vec![9, 3], 0));
        // NTP steps the clock back an hour (a multiple of both intervals): the next 9 s are polled as the first.
        let (polls, skipped, now) = run_for(&mut sched, now - 3_600_000, 9_000);
        assert_eq!((polls, skipped), (vec![9, 3], 0));
        // Back by 1.5 s, just after a tick of the 1 s group: it moves to the ticks of the new time; the 3 s
        // group's next tick is still within its interval and stays.
        let (polls, _, _) = run_for(&mut sched, now - 1_500, 3_000);
        assert_eq!(polls, vec![3, 1]);
        for t in &sched.ticks {
            assert_eq!(t.3 % t.2, 0, "aligned");
        }
    }

    #[test]
    fn a_clock_stepped_forward_polls_each_group_once_and_counts_the_ticks_stepped_over() {
        let start = 1_796_000_000_500;
        let mut sched = two_groups(start);
        let (_, _, now) = run_for(&mut sched, start, 3_000);
        // A minute forward, just after both groups' tick at `now`: one poll each at once (no burst), then the
        // intervals; of the 60 and 20 ticks stepped over, the two polled at once are not counted.
        let (polls, skipped, _) = run_for(&mut sched, now + 60_000, 3_000);
        assert_eq!((polls, skipped), (vec![4, 2], 59 + 19));
    }
}
