//! Control's config file (`ControlConfig::parse`: TOML, then `validate`), as every
//! `tether-control` command reads `control.toml`. Checks: never panics; a valid config
//! gives its derived settings, and what `save` would write reads back as a valid config
//! that writes the same text again.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tether_control::config::ControlConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("control.toml");
    let Ok(cfg) = ControlConfig::parse(text, path) else {
        return;
    };
    let _ = cfg.ca_config();
    let _ = cfg.domain_settings();
    let _ = cfg.database_url(Path::new("/var/lib/tether-control"));
    // `save` writes this text; `load` must take it back.
    let saved = toml::to_string_pretty(&cfg).expect("a valid config serializes");
    let back = ControlConfig::parse(&saved, path)
        .unwrap_or_else(|e| panic!("the saved config does not load: {e}\n{saved}"));
    assert_eq!(toml::to_string_pretty(&back).expect("serializes"), saved);
});
