//! The broker's config file (`Config::from_toml`, then `validate`), as `tether-broker`
//! reads it at start. Checks: never panics, including formatting a config (`Debug`,
//! which redacts) and the addresses a valid one derives.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tether_broker::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = Config::from_toml(text, Path::new("/etc/tether"), Path::new("broker.toml"))
    else {
        return;
    };
    let _ = format!("{cfg:?}");
    if cfg.validate().is_ok() {
        let _ = cfg.control_mode();
        let _ = cfg.transport.tcp_addr(cfg.listen);
        let _ = tether_broker::advertised_addr(&cfg, cfg.listen);
    }
});
