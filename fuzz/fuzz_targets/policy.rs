//! The customer policy and approvers parsers on arbitrary bytes: never panic; a policy
//! that parses evaluates any command without panicking, never classifies a shell command
//! as observe, and a deny rule it reports is one that refuses.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_ops::approvers::Approvers;
use tether_ops::policy::{Command, Policy};
use tether_ops::Phase;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Approvers::parse(text);
    }
    let Ok(policy) = Policy::parse(data) else {
        return;
    };
    let argvs: [&[&str]; 4] = [
        &["systemctl", "status", "x"],
        &["rm", "-rf", "/"],
        &["cat", "/etc/tether-agent/../shadow"],
        &["journalctl"],
    ];
    for argv in argvs {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        for shell in [false, true] {
            let cmd = Command {
                shell,
                argv: &argv,
                program: &format!("/usr/bin/{}", argv[0]),
            };
            let phase = policy.classify(&cmd);
            assert!(!(shell && phase == Phase::Observe));
            let denied = policy.denied(&cmd).is_some();
            let decided = policy.evaluate(&cmd, 1_790_000_000_000);
            if denied {
                assert!(decided.is_err());
            }
        }
    }
    let _ = policy.phases_summary();
});
