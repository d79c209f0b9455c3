//! `cinder verify DIR --key-file F [--json]`.

use std::path::PathBuf;

use serde_json::json;

use crate::Fatal;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The data dir.
    dir: PathBuf,
    /// The master key file (32 bytes, mode 0600).
    #[arg(long)]
    key_file: PathBuf,
    /// Print the report as one JSON document.
    #[arg(long)]
    json: bool,
}

/// Returns `Ok(true)` when no problem was found.
pub fn run(a: &Args) -> Result<bool, Fatal> {
    let dir = crate::data_dir(&a.dir)?;
    let key = crate::key(&a.key_file)?;
    let r = cinder::verify(&dir, &*key)?;
    if a.json {
        let f = |v: &[cinder::Finding]| {
            v.iter()
                .map(|p| json!({"file": p.file.display().to_string(), "offset": p.offset, "what": p.what}))
                .collect::<Vec<_>>()
        };
        let doc = json!({
            "ok": r.is_clean(),
            "segments": r.segments,
            "frames": r.frames,
            "messages": r.messages,
            "ack_records": r.ack_records,
            "problems": f(&r.problems),
            "notes": f(&r.notes),
        });
        println!("{doc:#}");
    } else {
        for p in &r.problems {
            println!("PROBLEM {p}");
        }
        for n in &r.notes {
            println!("note    {n}");
        }
        println!(
            "{}: {} segments, {} frames ({} messages, {} ack records) checked; {} problems, {} notes",
            if r.is_clean() { "OK" } else { "FAILED" },
            r.segments,
            r.frames,
            r.messages,
            r.ack_records,
            r.problems.len(),
            r.notes.len()
        );
    }
    Ok(r.is_clean())
}
