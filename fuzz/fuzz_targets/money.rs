#![no_main]

// The entry function is shared with the stable replay of the corpus (tests/fuzz_corpus.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| dealsync::fuzzing::money(data));
