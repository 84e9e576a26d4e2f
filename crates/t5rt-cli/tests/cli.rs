//! The `t5rt` binary end to end: the bundled model, JSONL in and out, and clear failures.

use std::path::PathBuf;
use std::process::{Command, Output};

fn t5rt(args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_t5rt"));
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("t5rt runs");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn fixture(variant: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(variant)
}

fn reference(variant: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(variant).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn bundled_model_spells_a_number() {
    let o = t5rt(&["generate", "spell: 1984", "spell: 42"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "one thousand nine hundred eighty-four\nforty-two\n"
    );
    assert!(
        stderr(&o).contains("tokens/s"),
        "summary line: {}",
        stderr(&o)
    );
}

#[test]
fn jsonl_ids_in_jsonl_out_match_hugging_face() {
    // The t5-v1_0 fixture has no tokenizer: ids in, ids out, in input order.
    let r = reference("t5-v1_0");
    let input: String = r["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ids| format!("{{\"input_ids\": {ids}}}\n"))
        .collect();
    let model = fixture("t5-v1_0");
    let o = t5rt(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--input",
            "-",
            "--max-new-tokens",
            "24",
            "--batch-size",
            "3",
        ],
        Some(&input),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let want = r["greedy"]["outputs"].as_array().unwrap();
    assert_eq!(lines.len(), want.len());
    for (line, w) in lines.iter().zip(want) {
        assert_eq!(&line["output_ids"], w);
        assert!(line["text"].is_null());
    }
}

#[test]
fn text_file_to_jsonl_file_with_the_bundled_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (inp, out) = (tmp.path().join("in.txt"), tmp.path().join("out.jsonl"));
    std::fs::write(&inp, "spell: 7\nspell: 300\n").unwrap();
    let o = t5rt(
        &[
            "generate",
            "--input",
            inp.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["text"], "seven");
    assert_eq!(lines[1]["text"], "three hundred");
    let ids = lines[1]["output_ids"].as_array().unwrap();
    assert_eq!(ids.last().unwrap(), 1, "output_ids end with EOS");
}

#[test]
fn failures_exit_non_zero_with_a_message() {
    let model = fixture("t5-v1_0");
    let m = model.to_str().unwrap();
    let cases: Vec<(Vec<&str>, Option<&str>, &str)> = vec![
        (
            vec!["generate", "--model", "/no/such/model", "hi"],
            None,
            "/no/such/model",
        ),
        (
            vec!["generate", "--input", "-"],
            Some("{\"text\": \"spell: 1\"}\n{broken\n"),
            "line 2",
        ),
        (
            vec!["generate", "--input", "-", "--input-format", "jsonl"],
            Some("{\"foo\": 1}\n"),
            "line 1",
        ),
        (vec!["generate", "--input", "-"], Some(""), "no inputs"),
        (
            vec!["generate", "--input", "-"],
            Some("spell: 1\n\nspell: 2\n"),
            "line 2: empty",
        ),
        (vec!["generate", ""], None, "empty"),
        (vec!["generate"], None, "nothing to generate"),
        (
            vec!["generate", "--model", m, "some text"],
            None,
            "tokenizer.json",
        ),
        (
            vec!["generate", "--max-input-tokens", "3", "spell: 123456"],
            None,
            "more than the limit of 3",
        ),
        (
            vec!["generate", "--input", "/no/such/file.txt"],
            None,
            "/no/such/file.txt",
        ),
    ];
    for (args, stdin, needle) in cases {
        let o = t5rt(&args, stdin);
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = stderr(&o);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

#[test]
fn reduced_precisions_spell_too_and_unknown_dtypes_are_refused() {
    for dtype in ["bf16", "int8"] {
        let o = t5rt(
            &["generate", "--dtype", dtype, "spell: 1984", "spell: 42"],
            None,
        );
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(
            stdout(&o),
            "one thousand nine hundred eighty-four\nforty-two\n",
            "--dtype {dtype}"
        );
        assert!(
            stderr(&o).contains(dtype),
            "summary names the dtype: {}",
            stderr(&o)
        );
    }
    let o = t5rt(&["generate", "--dtype", "fp8", "spell: 1"], None);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("expected f32, bf16 or int8"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn help_explains_every_flag() {
    let o = t5rt(&["generate", "--help"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let help = stdout(&o);
    for flag in [
        "--model",
        "--input",
        "--output",
        "--max-new-tokens",
        "--min-new-tokens",
        "--batch-size",
        "--threads",
        "--dtype",
        "--max-input-tokens",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn beams_and_n_best_in_jsonl() {
    let o = t5rt(
        &[
            "generate",
            "--num-beams",
            "4",
            "--num-return-sequences",
            "3",
            "--early-stopping",
            "never",
            "--output",
            "-",
            "spell: 1984",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let line: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(line["text"], "one thousand nine hundred eighty-four");
    let seqs = line["sequences"].as_array().unwrap();
    assert_eq!(seqs.len(), 3);
    assert_eq!(seqs[0]["output_ids"], line["output_ids"], "best first");
    let scores: Vec<f64> = seqs.iter().map(|s| s["score"].as_f64().unwrap()).collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "scores descend: {scores:?}"
    );
}

#[test]
fn sampling_is_reproducible_by_seed() {
    let run = |seed: &str| {
        let args = [
            "generate",
            "--do-sample",
            "--temperature",
            "50",
            "--top-k",
            "0",
            "--seed",
            seed,
            "spell: 123",
            "spell: 4567",
        ];
        let o = t5rt(&args, None);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    assert_eq!(run("5"), run("5"));
    assert_ne!(
        run("5"),
        run("6"),
        "at temperature 50 two seeds should differ"
    );
}

#[test]
fn stop_string_and_bad_decoding_options() {
    let o = t5rt(&["generate", "--stop", "thousand", "spell: 731999"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "seven hundred thirty-one thousand\n");
    for (args, needle) in [
        (
            vec!["generate", "--num-return-sequences", "2", "spell: 1"],
            "num_return_sequences",
        ),
        (
            vec!["generate", "--early-stopping", "sometimes", "spell: 1"],
            "sometimes",
        ),
        (
            vec!["generate", "--do-sample", "--top-p", "0", "spell: 1"],
            "top_p",
        ),
    ] {
        let o = t5rt(&args, None);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
}

/// `t5rt score` gives HF's teacher-forced log-probabilities (tests/fixtures/spell-numbers/
/// scores.json, from tools/make_score_reference.py) for ids given as JSONL, and scores a
/// text pair with the target tokenized as HF does (EOS last).
#[test]
fn score_matches_hugging_face_and_reads_text_pairs() {
    let text = std::fs::read_to_string(fixture("spell-numbers").join("scores.json")).unwrap();
    let want: serde_json::Value = serde_json::from_str(&text).unwrap();
    let lines: String = (0..want["inputs"].as_array().unwrap().len())
        .map(|i| {
            format!(
                "{{\"input_ids\": {}, \"target_ids\": {}}}\n",
                want["inputs"][i], want["targets"][i]
            )
        })
        .collect();
    let o = t5rt(
        &["score", "--input", "-", "--batch-size", "7"],
        Some(&lines),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), want["inputs"].as_array().unwrap().len());
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["target_ids"], want["targets"][i]);
        let (got, exp) = (
            row["token_log_probs"].as_array().unwrap(),
            want["token_log_probs"][i].as_array().unwrap(),
        );
        assert_eq!(got.len(), exp.len());
        for (g, e) in got.iter().zip(exp) {
            let (g, e) = (g.as_f64().unwrap(), e.as_f64().unwrap());
            assert!(
                (g - e).abs() <= 1.5e-5 * e.abs().max(1.0),
                "pair {i}: {g} vs {e}"
            );
        }
        let sum: f64 = got.iter().map(|v| v.as_f64().unwrap()).sum();
        assert!((row["log_prob"].as_f64().unwrap() - sum).abs() < 1e-6 * sum.abs().max(1.0));
    }
    // A text pair: the right spelling is likely, a wrong one is not.
    let o = t5rt(&["score", "spell: 42", "forty-two"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let right: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let o = t5rt(&["score", "spell: 42", "forty-three"], None);
    let wrong: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(
        right["target_ids"].as_array().unwrap().last().unwrap(),
        1,
        "EOS last"
    );
    assert!(right["log_prob"].as_f64().unwrap() > -0.1, "{right}");
    assert!(wrong["log_prob"].as_f64().unwrap() < -5.0, "{wrong}");
    // Bad input: a clear error, exit 1.
    let o = t5rt(&["score", "--input", "-"], Some("spell: 1 without a tab\n"));
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("expected SOURCE<TAB>TARGET"),
        "{}",
        stderr(&o)
    );
}

/// `t5rt convert` writes a checkpoint that `generate --dtype int8` runs to the original's int8
/// output; other precisions and a second conversion are clear errors.
#[test]
fn convert_then_generate_int8() {
    let tmp = tempfile::tempdir().unwrap();
    let bundled = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/spell-numbers");
    let out = tmp.path().join("int8");
    let o = t5rt(
        &[
            "convert",
            "--model",
            bundled.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("quantized to int8"), "{}", stderr(&o));
    let texts = ["spell: 1984", "spell: 7", "spell: 123456"];
    let mut args = vec![
        "generate",
        "--dtype",
        "int8",
        "--model",
        out.to_str().unwrap(),
    ];
    args.extend(texts);
    let converted = t5rt(&args, None);
    assert!(converted.status.success(), "{}", stderr(&converted));
    let mut args = vec!["generate", "--dtype", "int8"];
    args.extend(texts);
    assert_eq!(stdout(&converted), stdout(&t5rt(&args, None)));
    let f32 = t5rt(
        &["generate", "--model", out.to_str().unwrap(), "spell: 3"],
        None,
    );
    assert_eq!(f32.status.code(), Some(1));
    assert!(stderr(&f32).contains("--dtype int8"), "{}", stderr(&f32));
    let bf16 = t5rt(
        &[
            "convert",
            "--model",
            bundled.to_str().unwrap(),
            "--output",
            "/tmp/x",
            "--dtype",
            "bf16",
        ],
        None,
    );
    assert_eq!(bf16.status.code(), Some(1));
    assert!(stderr(&bf16).contains("only int8"), "{}", stderr(&bf16));
}
