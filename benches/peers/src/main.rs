//! cinder-peers: cinder against RocksDB, fjall, redb and SQLite on the relay's own
//! workload, next to the machine's limits measured in the same run.
//!
//! ```text
//! cd benches/peers && cargo run --release -- [flags]      # the full run (~15 min)
//! cargo run --release --no-default-features --features fjall,redb,sqlite -- --quick
//! ```
//! See `--help` and BENCHMARKS.md.

mod aead;
mod backend;
mod backends;
mod limits;
mod report;
mod workload;

use std::path::PathBuf;
use std::time::Duration;

use backend::{Mode, R};
use backends::cinder::CinderMode;
use report::{Row, Table};
use workload::{Cfg, Data};

#[derive(Debug, Clone)]
struct Args {
    queues: u32,
    messages: usize,
    sizes: Vec<usize>,
    max_bytes: usize,
    batch: usize,
    secs: f64,
    writers: usize,
    threads: Vec<usize>,
    shred_delay: Duration,
    backends: Vec<String>,
    dir: PathBuf,
    quick: bool,
    /// Run one cinder phase alone, for a profiler: "enqueue", "enqueue-nosync", "drain".
    profile: Option<String>,
}

const HELP: &str = "cinder-peers [flags]
  --queues N         queues (default 1000)
  --messages N       messages per cycle at 1 KiB (default 200000)
  --sizes A,B,..     payload sizes in bytes (default 64,1024,16384)
  --max-bytes N      cap on payload bytes per cycle; larger payloads get fewer messages
                     (default 536870912: 32768 messages at 16 KiB)
  --batch N          operations per commit/fsync (default 64)
  --secs S           length of the timed writer and mixed phases (default 5)
  --writers N        concurrent writers (default 32)
  --threads A,B      mixed-phase thread counts (default 1,4)
  --shred-delay S    cinder's max_shred_delay in seconds (default 2)
  --backends a,b     subset of: cinder,rocksdb,fjall,redb,sqlite (default: all compiled in)
  --dir D            where the data dirs go (default $CINDER_BENCH_DIR or ./target)
  --quick            a seconds-long smoke of everything (CI)
  --profile PHASE    only cinder, one phase repeated for --secs, for perf:
                     enqueue | enqueue-nosync | drain (at the first --sizes)";

fn parse_args() -> R<Args> {
    let mut a = Args {
        queues: 1000,
        messages: 200_000,
        sizes: vec![64, 1024, 16384],
        max_bytes: 512 << 20,
        batch: 64,
        secs: 5.0,
        writers: 32,
        threads: vec![1, 4],
        shred_delay: Duration::from_secs(2),
        backends: backends::available()
            .iter()
            .map(|s| s.to_string())
            .collect(),
        dir: std::env::var_os("CINDER_BENCH_DIR")
            .map_or_else(|| PathBuf::from("target"), PathBuf::from),
        quick: false,
        profile: None,
    };
    let mut it = std::env::args().skip(1);
    let list =
        |v: String| -> R<Vec<usize>> { v.split(',').map(|x| Ok(x.trim().parse()?)).collect() };
    while let Some(flag) = it.next() {
        if flag == "--quick" {
            a.quick = true;
            a.queues = 20;
            a.messages = 2_000;
            a.secs = 0.3;
            a.shred_delay = Duration::from_millis(300);
            continue;
        }
        if flag == "--help" || flag == "-h" {
            println!("{HELP}");
            std::process::exit(0);
        }
        if flag == "--bench" {
            continue; // passed by `cargo bench`
        }
        let v = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{HELP}"))?;
        match flag.as_str() {
            "--queues" => a.queues = v.parse()?,
            "--messages" => a.messages = v.parse()?,
            "--sizes" => a.sizes = list(v)?,
            "--max-bytes" => a.max_bytes = v.parse()?,
            "--batch" => a.batch = v.parse()?,
            "--secs" => a.secs = v.parse()?,
            "--writers" => a.writers = v.parse()?,
            "--threads" => a.threads = list(v)?,
            "--shred-delay" => a.shred_delay = Duration::from_secs_f64(v.parse()?),
            "--backends" => a.backends = v.split(',').map(|s| s.trim().to_string()).collect(),
            "--dir" => a.dir = v.into(),
            "--profile" => a.profile = Some(v),
            _ => return Err(format!("unknown flag {flag}\n{HELP}").into()),
        }
    }
    if a.queues == 0 || a.messages == 0 || a.batch == 0 || a.writers == 0 {
        return Err("--queues, --messages, --batch and --writers must be positive".into());
    }
    if a.sizes.iter().any(|&s| s < 12) {
        return Err("payload sizes must be at least 12 bytes".into());
    }
    for b in &a.backends {
        if !backends::available().contains(&b.as_str()) {
            return Err(format!(
                "backend {b} not compiled in; have {:?}",
                backends::available()
            )
            .into());
        }
    }
    Ok(a)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("cinder-peers: {e}");
        std::process::exit(1);
    }
}

fn run() -> R<()> {
    let args = parse_args()?;
    std::fs::create_dir_all(&args.dir)?;
    let tmp = tempfile::Builder::new()
        .prefix("cinder-peers-")
        .tempdir_in(&args.dir)?;
    if let Some(p) = &args.profile {
        return profile(&args, tmp.path(), p);
    }
    report::preamble(&args.sizes);
    eprintln!("measuring the machine's limits...");
    let lim = limits::measure(
        tmp.path(),
        &args.sizes,
        args.batch,
        if args.quick { 0.05 } else { 1.0 },
        args.quick,
    )?;
    report::limits(&lim);

    let key_dir = tmp.path().join("keys");
    std::fs::create_dir_all(&key_dir)?;
    let mut table = Table::default();
    let mut run_no = 0;
    let mut fresh = |name: &str, mode: Mode, cm: Option<CinderMode>| {
        run_no += 1;
        let dir = tmp.path().join(format!("{name}-{run_no}"));
        let b = backends::open(name, &dir, &key_dir, mode, cm, args.shred_delay);
        b.map(|b| (b, dir))
    };

    for &size in &args.sizes {
        let messages = args
            .messages
            .min(args.max_bytes / size)
            .max(args.queues as usize);
        let cfg = Cfg {
            queues: args.queues,
            messages,
            size,
            batch: args.batch,
            samples: 1000,
        };
        let data = Data::new(&cfg);
        for name in &args.backends {
            for mode in [Mode::Sync, Mode::NoSync] {
                eprintln!("{name}: {size} B, {messages} messages, {mode:?} cycle...");
                let (b, dir) = fresh(name, mode, None)?;
                let c = workload::cycle(&*b, &dir, &data, &cfg, mode == Mode::Sync)?;
                drop(b);
                std::fs::remove_dir_all(&dir)?;
                table.cycle(name, size, mode, &cfg, &c, &lim);
            }
        }
    }

    // Concurrency and the steady mix, at 1 KiB (or the middle size given).
    let size = args.sizes[args.sizes.len() / 2];
    let cfg = Cfg {
        queues: args.queues,
        messages: args.messages.min(args.max_bytes / size).min(50_000),
        size,
        batch: args.batch,
        samples: 0,
    };
    let data = Data::new(&cfg);
    for name in &args.backends {
        eprintln!("{name}: {} concurrent writers...", args.writers);
        let (b, dir) = fresh(name, Mode::Sync, None)?;
        let rate = workload::writers(&*b, &data, args.writers, args.secs)?;
        drop(b);
        std::fs::remove_dir_all(&dir)?;
        table.push(Row::rate(
            name,
            size,
            &format!("enqueue, {} writers, durable each", args.writers),
            rate,
            Some(report::writers_limit(&lim, size)),
        ));
        for &t in &args.threads {
            eprintln!("{name}: mixed, {t} threads...");
            let (b, dir) = fresh(name, Mode::Sync, Some(CinderMode::AsyncFlushEach))?;
            let rate = workload::mixed(&*b, &data, &cfg, t, 10, args.secs)?;
            drop(b);
            std::fs::remove_dir_all(&dir)?;
            table.push(Row::rate(
                name,
                size,
                &format!("mixed, {t} threads"),
                rate,
                Some(report::mixed_limit(&lim, size, args.batch)),
            ));
        }
    }
    table.print();
    report::targets(&table, &lim, &args.sizes);
    Ok(())
}

/// One cinder phase alone, repeated for `--secs`: what `perf record` should look at.
fn profile(args: &Args, tmp: &std::path::Path, phase: &str) -> R<()> {
    let size = args.sizes[0];
    let cfg = Cfg {
        queues: args.queues,
        messages: args.messages.min(args.max_bytes / size),
        size,
        batch: args.batch,
        samples: 0,
    };
    let data = Data::new(&cfg);
    let mode = if phase == "enqueue-nosync" {
        Mode::NoSync
    } else {
        Mode::Sync
    };
    let key_dir = tmp.join("keys");
    std::fs::create_dir_all(&key_dir)?;
    let b = backends::open(
        "cinder",
        &tmp.join("cinder"),
        &key_dir,
        mode,
        None,
        args.shred_delay,
    )?;
    let (n, secs) = match phase {
        "enqueue" | "enqueue-nosync" => workload::profile_enqueue(&*b, &data, &cfg, args.secs)?,
        "drain" => workload::profile_drain(&*b, &data, &cfg, args.secs)?,
        _ => {
            return Err(format!("--profile {phase}: want enqueue, enqueue-nosync or drain").into())
        }
    };
    println!(
        "{phase}, {size} B: {n} messages in {secs:.2} s = {:.0} msgs/s",
        n as f64 / secs
    );
    Ok(())
}
