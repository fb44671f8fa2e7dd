//! The configuration loader: TOML text through figment into `Config` (`Config::from_toml`, the
//! parsing `Config::load` does on a file), then `Config::validate` into the typed `Settings`.
#![no_main]

use cachectl_server::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(config) = Config::from_toml(text) {
        let _ = std::hint::black_box(config.validate());
    }
});
