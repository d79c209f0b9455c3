//! `cinder inspect DIR [--key-file F] [--show-queues] [--json]`.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::Fatal;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The data dir.
    dir: PathBuf,
    /// The master key file; without it only plaintext framing is shown.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// List queue ids and their lengths (they identify recipients: off by default).
    #[arg(long, requires = "key_file")]
    show_queues: bool,
    /// Print the report as one JSON document.
    #[arg(long)]
    json: bool,
}

/// Returns `Ok(true)`: inspecting finds no "problems" (use `verify` for that), but a
/// damaged segment still makes the exit code 1.
pub fn run(a: &Args) -> Result<bool, Fatal> {
    let dir = crate::data_dir(&a.dir)?;
    let key = a.key_file.as_deref().map(crate::key).transpose()?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let r = cinder::inspect(
        &dir,
        key.as_deref().map(|k| k as &dyn cinder::KeyProvider),
        now,
        a.show_queues,
    )?;
    let healthy = r.segments.iter().all(|s| s.state != "damaged");
    if a.json {
        println!("{:#}", to_json(&r));
    } else {
        print_text(&r);
    }
    Ok(healthy)
}

fn queue_id(q: &[u8]) -> String {
    match std::str::from_utf8(q) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => s.to_string(),
        _ => q
            .iter()
            .fold(String::with_capacity(q.len() * 2), |mut s, b| {
                use std::fmt::Write;
                let _ = write!(s, "{b:02x}");
                s
            }),
    }
}

fn to_json(r: &cinder::InspectReport) -> Value {
    let segs: Vec<Value> = r
        .segments
        .iter()
        .map(|s| {
            json!({
                "id": s.id, "file": s.file.display().to_string(), "size": s.size,
                "records": s.records, "state": s.state, "dek_id": s.dek_id, "kek_id": s.kek_id.map(|k| format!("{k:016x}")),
                "has_key": s.has_key, "live": s.live, "acked": s.acked, "expired": s.expired, "ack_records": s.ack_records,
            })
        })
        .collect();
    let queues = r.queues.as_ref().map(|q| {
        json!({
            "queues": q.queues,
            "length_histogram": q.length_histogram.iter().map(|(l, n)| json!({"length": l, "queues": n})).collect::<Vec<_>>(),
            "queue_lengths": q.queue_lengths.as_ref().map(|v| v.iter().map(|(id, n)| json!({"queue": queue_id(id), "length": n})).collect::<Vec<_>>()),
        })
    });
    json!({
        "segments": segs,
        "keystore": {
            "present": r.keystore.present, "live_keys": r.keystore.live_keys, "generation": r.keystore.generation,
            "next_segment_id": r.keystore.next_segment_id, "keys_without_file": r.keystore.keys_without_file,
        },
        "segments_without_key": r.segments_without_key,
        "unknown_files": r.unknown_files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "queues": queues,
        "live_messages": r.live_messages,
        "oldest_live_age_ms": r.oldest_live_age_ms,
        "dead_but_openable": r.dead_but_openable,
        "oldest_expired_openable_age_ms": r.oldest_expired_openable_age_ms,
    })
}

fn print_text(r: &cinder::InspectReport) {
    println!("segments: {}", r.segments.len());
    for s in &r.segments {
        let counts = match (s.live, s.acked, s.expired) {
            (Some(l), Some(a), Some(e)) => format!(" live={l} acked={a} expired={e}"),
            _ => String::new(),
        };
        println!(
            "  {:016x} {:>10} bytes {:>7} records {:<7} dek={} kek={} key={}{counts}",
            s.id,
            s.size,
            s.records,
            s.state,
            s.dek_id.map_or("?".into(), |d| d.to_string()),
            s.kek_id.map_or("?".into(), |k| format!("{k:016x}")),
            if s.has_key { "yes" } else { "GONE" },
        );
    }
    let k = &r.keystore;
    println!(
        "keystore: {} live keys, generation {}, next segment id {}{}",
        k.live_keys,
        k.generation,
        k.next_segment_id,
        if k.present { "" } else { " (MISSING)" }
    );
    if !k.keys_without_file.is_empty() {
        println!("  keys without a segment file: {:?}", k.keys_without_file);
    }
    if !r.segments_without_key.is_empty() {
        println!("segments whose key is gone: {:?}", r.segments_without_key);
    }
    for u in &r.unknown_files {
        println!("unknown file: {}", u.display());
    }
    if let Some(q) = &r.queues {
        println!("live messages: {}", r.live_messages.unwrap_or(0));
        println!("queues: {}", q.queues);
        for (label, n) in &q.length_histogram {
            println!("  length {label:>9}: {n} queues");
        }
        if let Some(list) = &q.queue_lengths {
            for (id, n) in list {
                println!("  {} {n}", queue_id(id));
            }
        }
        match r.oldest_live_age_ms {
            Some(ms) => println!("oldest live message: {:.1} s old", ms as f64 / 1000.0),
            None => println!("oldest live message: none"),
        }
        println!(
            "dead but still openable records: {}{}",
            r.dead_but_openable.unwrap_or(0),
            r.oldest_expired_openable_age_ms
                .map_or(String::new(), |ms| format!(
                    " (oldest expired {:.1} s ago)",
                    ms as f64 / 1000.0
                ))
        );
    }
}
