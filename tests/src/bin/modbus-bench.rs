//! Modbus benchmark: the agent's coalesced request plan against a naive poller that sends one request per point
//! (like the ThingsBoard gateway), on the same pymodbus device in the same run. Both poll back to back for a
//! fixed time; reports points/s and requests per poll.
//!
//! Run: `deploy/bench.sh` (or `cargo run --release -p fieldlink-e2e --bin modbus-bench`).
#![allow(clippy::unwrap_used)]

use fieldlink_agent::modbus::plan::{Request, Table};
use fieldlink_agent::modbus::{compile, ModbusConfig};
use fieldlink_e2e::*;
use std::time::{Duration, Instant};
use tokio_modbus::client::{Context, Reader};
use tokio_modbus::slave::Slave;

const POINTS: &str = r#"
name = "bench"
transport = "tcp"
address = "127.0.0.1:0"
[[groups]]
name = "all"
interval_ms = 1000
"#;

/// The test device's 17 readable points (see `tests/python/modbus_device.py`).
const LAYOUT: [(&str, &str, u16, &str); 17] = [
    ("i16", "holding", 0, "i16"),
    ("u16", "holding", 1, "u16"),
    ("i32", "holding", 2, "i32"),
    ("u32", "holding", 4, "u32"),
    ("f32", "holding", 6, "f32"),
    ("f32b", "holding", 8, "f32"),
    ("i64", "holding", 10, "i64"),
    ("u64", "holding", 14, "u64"),
    ("f64", "holding", 18, "f64"),
    ("bit1", "holding", 26, "u16"),
    ("pad", "holding", 22, "u16"),
    ("voltage", "input", 0, "f32"),
    ("counter", "input", 2, "u16"),
    ("coil0", "coil", 0, ""),
    ("coil1", "coil", 1, ""),
    ("coil2", "coil", 2, ""),
    ("di3", "discrete", 3, ""),
];

async fn read(ctx: &mut Context, r: &Request) {
    match r.table {
        Table::Coil => drop(ctx.read_coils(r.start, r.count).await.unwrap().unwrap()),
        Table::Discrete => drop(
            ctx.read_discrete_inputs(r.start, r.count)
                .await
                .unwrap()
                .unwrap(),
        ),
        Table::Holding => drop(
            ctx.read_holding_registers(r.start, r.count)
                .await
                .unwrap()
                .unwrap(),
        ),
        Table::Input => drop(
            ctx.read_input_registers(r.start, r.count)
                .await
                .unwrap()
                .unwrap(),
        ),
    }
}

async fn run(port: u16, requests: &[Request], secs: u64) -> (f64, usize) {
    let mut ctx = tokio_modbus::client::tcp::connect_slave(
        format!("127.0.0.1:{port}").parse().unwrap(),
        Slave(1),
    )
    .await
    .unwrap();
    let points: usize = requests.iter().map(|r| r.points.len()).sum();
    let (start, mut polls) = (Instant::now(), 0usize);
    while start.elapsed() < Duration::from_secs(secs) {
        for r in requests {
            read(&mut ctx, r).await;
        }
        polls += 1;
    }
    (
        (polls * points) as f64 / start.elapsed().as_secs_f64(),
        requests.len(),
    )
}

fn main() {
    let mut toml_text = POINTS.to_owned();
    for (name, reg, addr, ty) in LAYOUT {
        toml_text += &format!("[[points]]\nname = \"{name}\"\ngroup = \"all\"\nregister = \"{reg}\"\naddress = {addr}\n");
        if !ty.is_empty() {
            toml_text += &format!("type = \"{ty}\"\n");
        }
    }
    let cfg: ModbusConfig = toml::from_str(&toml_text).unwrap();
    let plan = compile(&cfg);
    let coalesced = plan.groups[0].requests.clone();
    let naive: Vec<Request> = cfg
        .points
        .iter()
        .enumerate()
        .map(|(i, p)| Request {
            table: p.register,
            start: p.address,
            count: p.size(),
            points: vec![(i, 0)],
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let device = ModbusDevice::tcp(dir.path(), free_port());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (naive_rate, naive_reqs) = rt.block_on(run(device.port, &naive, 5));
    let (ours, ours_reqs) = rt.block_on(run(device.port, &coalesced, 5));
    println!(
        "Modbus polling, {} points, pymodbus TCP device, 5 s back to back each:",
        LAYOUT.len()
    );
    println!("  naive (one request per point):  {naive_rate:>8.0} points/s, {naive_reqs} requests per poll");
    println!("  fieldlink (coalesced plan):     {ours:>8.0} points/s, {ours_reqs} requests per poll  ({:.1}x)", ours / naive_rate);
}
