//! Replays the fuzz corpus on stable Rust: every file under `fuzz/corpus/<target>/` and
//! `fuzz/regressions/<target>/` goes through the same entry function the fuzz target
//! calls (`dealsync::fuzzing`), so each `cargo test` checks the inputs the fuzzer
//! kept and every crash it ever found, without nightly or libFuzzer.
//! See docs/testing.md, "Fuzzing".

use dealsync::fuzzing::TARGETS;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `dir`, sorted; none when it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("reading a corpus directory").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_and_regression_input_passes_its_fuzz_target() {
    let mut failures = Vec::new();
    for (name, run) in TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(name));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{name}/ is empty: run scripts/fuzz-seeds.py"
        );
        let regressions = files(&fuzz_dir().join("regressions").join(name));
        for path in corpus.iter().chain(&regressions) {
            let data = std::fs::read(path).expect("reading a corpus file");
            if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
                failures.push(path.display().to_string());
            }
        }
    }
    assert!(
        failures.is_empty(),
        "these inputs fail their fuzz target (the panic of each is printed above):\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_fuzz_target_calls_its_library_entry_function_and_nothing_else_is_in_the_corpus() {
    let manifest =
        std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("reading fuzz/Cargo.toml");
    for (name, _) in TARGETS {
        let path = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
        let source = std::fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        assert!(
            source.contains(&format!("dealsync::fuzzing::{name}(data)")),
            "{} does not call dealsync::fuzzing::{name}",
            path.display()
        );
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml has no [[bin]] {name}"
        );
    }
    let known: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
    for kind in ["corpus", "regressions", "fuzz_targets"] {
        let Ok(entries) = std::fs::read_dir(fuzz_dir().join(kind)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("reading fuzz/").path();
            let stem = path
                .file_stem()
                .and_then(|stem| stem.to_str())
                .unwrap_or_default();
            assert!(
                known.contains(&stem),
                "{} names no target of dealsync::fuzzing::TARGETS",
                path.display()
            );
        }
    }
}
