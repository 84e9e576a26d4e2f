//! The bad-input gauntlet through the `t5rt` binary: hostile values of every option and
//! every input file, each run under an address-space limit (`ulimit -v`) and a time bound, so
//! that a regression fails this test instead of taking the machine down. Every case must
//! exit 0, or exit 1 (2 for a malformed command line) with a one-line `error: ...`: never
//! a panic (101), an abort (134), a kill (137) or a hang.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Address space each run may map, KiB (the bundled model needs a few hundred MiB).
const MEMORY_KIB: u64 = 4 << 20;
const BOUND: Duration = Duration::from_secs(30);

/// Runs `t5rt ARGS` under the limits; returns (exit code, stderr).
fn run(args: &[&str]) -> (i32, String) {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {MEMORY_KIB} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_t5rt"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sh runs");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > BOUND {
            let _ = child.kill();
            panic!("t5rt {args:?}: still running after {BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let code = status
        .code()
        .unwrap_or_else(|| panic!("t5rt {args:?}: killed by a signal"));
    (code, err)
}

/// Exit 0, or a clear failure.
fn check(args: &[&str]) -> i32 {
    let (code, err) = run(args);
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "t5rt {args:?} panicked: {err}"
    );
    match code {
        0 => {}
        1 | 2 => {
            let first = err.lines().find(|l| l.starts_with("error"));
            assert!(
                first.is_some(),
                "t5rt {args:?}: exit {code} without an error line: {err}"
            );
            if code == 1 {
                // Our own errors: exactly one line.
                assert_eq!(err.trim_end().lines().count(), 1, "t5rt {args:?}: {err}");
            }
        }
        other => panic!("t5rt {args:?}: exit {other}: {err}"),
    }
    code
}

#[test]
fn the_issue_table_is_refused_at_once() {
    for args in [
        ["--max-new-tokens", "100000000000"],
        ["--num-beams", "100000"],
        ["--num-beams", "5000"],
        ["--num-return-sequences", "10000000"],
        ["--threads", "100000"],
    ] {
        let mut all = vec!["generate", "--do-sample"];
        if args[0] == "--num-beams" {
            all.pop();
        }
        all.extend(args);
        all.push("spell: 5");
        assert_eq!(check(&all), 1, "{all:?}");
    }
}

#[test]
fn hostile_values_of_every_option() {
    let values = [
        "0",
        "-1",
        "1",
        "nan",
        "NaN",
        "inf",
        "-inf",
        "1e308",
        "18446744073709551616",
        "99999999999999999999999",
        "",
        "abc",
        "0.5",
    ];
    let options = [
        "--max-new-tokens",
        "--min-new-tokens",
        "--batch-size",
        "--threads",
        "--dtype",
        "--max-input-tokens",
        "--max-memory",
        "--num-beams",
        "--length-penalty",
        "--early-stopping",
        "--num-return-sequences",
        "--no-repeat-ngram-size",
        "--repetition-penalty",
        "--temperature",
        "--top-k",
        "--top-p",
        "--seed",
        "--stop",
        "--input-format",
    ];
    let mut outcomes = [0usize; 3];
    for opt in options {
        for v in values {
            // Sampling, so that the warpers' values are used, not only parsed.
            let code = check(&["generate", "--do-sample", opt, v, "spell: 42"]);
            outcomes[code as usize] += 1;
        }
    }
    // Both kinds happened: the gauntlet is not all refusals, nor all runs.
    assert!(
        outcomes[0] > 10 && outcomes[1] + outcomes[2] > 100,
        "{outcomes:?}"
    );
}

#[test]
fn hostile_input_files() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p.display().to_string()
    };
    let binary: Vec<u8> = (0..4096u32).map(|i| (i * 2654435761 % 251) as u8).collect();
    let files = [
        write("empty.txt", b""),
        write("blank.txt", b"\n\n   \n"),
        write("binary.txt", &binary),
        write("bad.jsonl", b"{\"input_ids\": [1, 2, \n"),
        write("ids.jsonl", b"{\"input_ids\": [5, 99999999999, -1]}\n"),
        write("empty-ids.jsonl", b"{\"input_ids\": []}\n"),
        write(
            "both.jsonl",
            b"{\"input_ids\": [5, 1], \"text\": \"spell: 1\"}\n",
        ),
        write("neither.jsonl", b"{\"foo\": 1}\n"),
        write(
            "long.txt",
            format!("spell: {}\n", "9".repeat(100_000)).as_bytes(),
        ),
        write("nul.txt", b"spell: 1\0 2\n"),
        tmp.path().display().to_string(), // a directory
        tmp.path().join("missing.txt").display().to_string(),
    ];
    for f in &files {
        check(&["generate", "--input", f]);
        check(&["generate", "--input", f, "--input-format", "jsonl"]);
        check(&["score", "--input", f]);
    }
    // Output where it cannot be written.
    check(&[
        "generate",
        "--output",
        &tmp.path().display().to_string(),
        "spell: 3",
    ]);
    check(&["generate", "--output", "/proc/version", "spell: 3"]);
}

#[test]
fn hostile_model_directories() {
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/spell-numbers");
    let tmp = tempfile::tempdir().unwrap();
    let copy = |name: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::copy(bundled.join(f), dir.join(f)).unwrap();
        }
        dir
    };
    let mut dirs = vec![tmp.path().join("missing"), tmp.path().to_path_buf()];
    let d = copy("absurd");
    std::fs::write(
        d.join("config.json"),
        r#"{"d_model": 1000000000000, "num_layers": 2}"#,
    )
    .unwrap();
    dirs.push(d);
    for (name, file) in [
        ("cut-weights", "model.safetensors"),
        ("cut-tokenizer", "tokenizer.json"),
        ("cut-config", "config.json"),
    ] {
        let d = copy(name);
        let bytes = std::fs::read(d.join(file)).unwrap();
        std::fs::write(d.join(file), &bytes[..bytes.len() / 3]).unwrap();
        dirs.push(d);
    }
    let d = copy("huge-header");
    // A safetensors header that claims 2^60 bytes of header.
    std::fs::write(d.join("model.safetensors"), (1u64 << 60).to_le_bytes()).unwrap();
    dirs.push(d);
    for d in &dirs {
        let dir = d.display().to_string();
        assert_eq!(
            check(&["generate", "--model", &dir, "spell: 1"]),
            1,
            "{dir}"
        );
        // bench works on token ids and never reads the tokenizer: a broken one is no error.
        let bench_fails = !dir.ends_with("cut-tokenizer");
        assert_eq!(
            check(&["bench", "--model", &dir, "--case", "1:4:2"]),
            i32::from(bench_fails),
            "{dir}"
        );
    }
}

#[test]
fn hostile_bench_options() {
    for args in [
        vec!["bench", "--case", "0:0:0"],
        vec![
            "bench",
            "--case",
            "1000000:1000000:1000000",
            "--repeats",
            "1",
        ],
        vec!["bench", "--case", "x"],
        vec!["bench", "--repeats", "0"],
        vec!["bench", "--case", "1:4:2", "--threads", "100000"],
        vec!["bench", "--case", "1:4:2", "--inputs", "/nonexistent"],
    ] {
        assert_ne!(check(&args), 0, "{args:?}");
    }
}
