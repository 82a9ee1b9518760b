//! The customer's `policy.toml`: which permission phases are open, which need an
//! approval, which Unix user runs them, how commands are classified, and what is never
//! run at all.
//!
//! ```toml
//! allow_same_uid = false          # true only where the agent cannot switch users
//! [limits]
//! clock_skew = "60s"              # at most 5 min
//! max_approval_validity = "1h"    # at most 24 h
//! allow_shell = false
//!
//! [phases.observe]
//! enabled = true
//! approval = "none"
//! run_as = "tether-observe"
//! [phases.operate]
//! enabled = true
//! approval = "required"
//! run_as = "tether-ops"
//! enabled_until = "2026-12-01T18:00:00Z"   # optional
//!
//! [[classify]]                    # first match wins; unmatched is operate
//! argv = ["systemctl", "status", "*"]
//! phase = "observe"
//!
//! [[deny]]                        # before everything; beats any approval
//! program = ["rm", "dd", "mkfs*"]
//! [[deny]]
//! any_arg = ["/etc/tether-agent/**"]
//! ```
//!
//! Evaluation (design §2.2): deny → classify → phase open → approval needed. Rules
//! match the **resolved, canonical program path** the agent will execute (so matching
//! and execution cannot disagree): a pattern with a `/` matches the whole path, one
//! without matches its file name. Each other element of a rule's `argv` is a glob for
//! one argument; an element that is exactly `**` matches any number of arguments. A
//! phase without a table is disabled. A shell command is never `observe` and is refused
//! unless `allow_shell`; deny rules cannot see inside a shell string.

use std::time::Duration;

use globset::{Glob, GlobMatcher};
use serde::Deserialize;

use crate::{parse_rfc3339_ms, sha256_hex, CommandFailure, Phase, Refusal};

/// The longest `policy.toml` read.
pub const MAX_FILE_LEN: usize = 256 * 1024;
/// [`Limits::clock_skew`] default and ceiling.
pub const DEFAULT_SKEW: Duration = Duration::from_secs(60);
/// The largest clock skew a policy may allow.
pub const MAX_SKEW: Duration = Duration::from_secs(300);
/// [`Limits::max_approval_validity`] default.
pub const DEFAULT_MAX_VALIDITY: Duration = Duration::from_secs(3600);
/// The longest approval window a policy may allow.
pub const MAX_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// Whether a phase needs a customer approval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalMode {
    /// Runs without one.
    None,
    /// Needs one per command.
    Required,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    version: Option<u32>,
    #[serde(default)]
    allow_same_uid: bool,
    #[serde(default)]
    limits: LimitsFile,
    #[serde(default)]
    phases: PhasesFile,
    #[serde(default)]
    classify: Vec<ClassifyFile>,
    #[serde(default)]
    deny: Vec<DenyFile>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    #[serde(default, with = "humantime_serde")]
    clock_skew: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    max_approval_validity: Option<Duration>,
    #[serde(default)]
    allow_shell: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PhasesFile {
    observe: Option<PhaseFile>,
    deploy: Option<PhaseFile>,
    operate: Option<PhaseFile>,
    install: Option<PhaseFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PhaseFile {
    enabled: bool,
    approval: ApprovalMode,
    run_as: String,
    #[serde(default)]
    enabled_until: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassifyFile {
    argv: Vec<String>,
    phase: Phase,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DenyFile {
    #[serde(default)]
    program: Vec<String>,
    #[serde(default)]
    any_arg: Vec<String>,
}

/// The limits of approvals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// How far the agent's clock may be off an approval's window.
    pub clock_skew: Duration,
    /// The longest window an approval may have.
    pub max_approval_validity: Duration,
    /// Whether shell commands may run at all.
    pub allow_shell: bool,
}

/// One phase's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseRule {
    /// Open or closed.
    pub enabled: bool,
    /// Whether it needs an approval.
    pub approval: ApprovalMode,
    /// The Unix user its commands run as.
    pub run_as: String,
    /// Closed from this time on (ms since the epoch), if set.
    pub enabled_until_ms: Option<i64>,
}

/// A program or argument pattern: matched against the full path when it has a `/`, else
/// against the file name (for programs) or the whole argument.
#[derive(Clone, Debug)]
struct Pattern {
    text: String,
    matcher: GlobMatcher,
}

impl Pattern {
    fn new(text: &str) -> Result<Pattern, String> {
        if text.is_empty() {
            return Err("an empty pattern".into());
        }
        let matcher = Glob::new(text)
            .map_err(|e| format!("pattern {text:?}: {e}"))?
            .compile_matcher();
        Ok(Pattern {
            text: text.to_owned(),
            matcher,
        })
    }

    /// For a program: the whole canonical path if the pattern has a `/`, else its file
    /// name.
    fn matches_program(&self, path: &str) -> bool {
        if self.text.contains('/') {
            self.matcher.is_match(path)
        } else {
            self.matcher
                .is_match(path.rsplit('/').next().unwrap_or(path))
        }
    }

    /// For an argument: the argument as given or, if it names a path, with `.` and `..`
    /// resolved lexically (so `/etc/x/../tether-agent/k` still meets `/etc/tether-agent/**`).
    fn matches_arg(&self, arg: &str) -> bool {
        self.matcher.is_match(arg) || (arg.contains('/') && self.matcher.is_match(normalize(arg)))
    }
}

/// `.` and `..` removed lexically from a path.
fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    let joined = parts.join("/");
    if path.starts_with('/') {
        format!("/{joined}")
    } else {
        joined
    }
}

/// One element of a classification rule's `argv`.
#[derive(Clone, Debug)]
enum ArgPattern {
    /// `**`: any number of arguments.
    Any,
    One(Pattern),
}

#[derive(Clone, Debug)]
struct Classify {
    program: Pattern,
    args: Vec<ArgPattern>,
    phase: Phase,
}

#[derive(Clone, Debug)]
struct Deny {
    program: Vec<Pattern>,
    any_arg: Vec<Pattern>,
}

/// A parsed, compiled `policy.toml`.
#[derive(Clone, Debug)]
pub struct Policy {
    /// SHA-256 (hex) of the file's bytes: which policy decided, in manifests and `Status`.
    pub sha256: String,
    /// The file's `version` (1 if absent).
    pub version: u32,
    /// The customer accepts that commands run as the agent's own user.
    pub allow_same_uid: bool,
    /// Approval limits.
    pub limits: Limits,
    phases: [Option<PhaseRule>; 4],
    classify: Vec<Classify>,
    deny: Vec<Deny>,
}

/// A command as the agent is about to run it.
#[derive(Clone, Copy, Debug)]
pub struct Command<'a> {
    /// Whether it is a shell command.
    pub shell: bool,
    /// The arguments as received (`argv[0]` as the vendor named the program).
    pub argv: &'a [String],
    /// The resolved, canonical path of the program that would run.
    pub program: &'a str,
}

/// What the policy decided for a command that may run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Its phase.
    pub phase: Phase,
    /// Whether it needs a customer approval.
    pub approval_required: bool,
    /// The user it runs as.
    pub run_as: String,
}

impl Policy {
    /// Parse and compile `policy.toml`. Any error refuses the whole file: a broken policy
    /// refuses every command (design §1.7), it never falls back to an older one.
    pub fn parse(bytes: &[u8]) -> Result<Policy, String> {
        if bytes.len() > MAX_FILE_LEN {
            return Err(format!("policy.toml is longer than {MAX_FILE_LEN} bytes"));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| "policy.toml is not UTF-8".to_owned())?;
        let file: File = toml::from_str(text).map_err(|e| format!("policy.toml: {e}"))?;
        let version = file.version.unwrap_or(1);
        if version != 1 {
            return Err(format!(
                "policy.toml: version {version} is not supported (1 is)"
            ));
        }
        let clock_skew = file.limits.clock_skew.unwrap_or(DEFAULT_SKEW);
        if clock_skew > MAX_SKEW {
            return Err(format!(
                "policy.toml: limits.clock_skew is at most {MAX_SKEW:?}"
            ));
        }
        let max_approval_validity = file
            .limits
            .max_approval_validity
            .unwrap_or(DEFAULT_MAX_VALIDITY);
        if max_approval_validity > MAX_VALIDITY || max_approval_validity.is_zero() {
            return Err(format!(
                "policy.toml: limits.max_approval_validity must be between 1 ms and {MAX_VALIDITY:?}"
            ));
        }
        let phase = |name: &str, p: Option<PhaseFile>| -> Result<Option<PhaseRule>, String> {
            let Some(p) = p else { return Ok(None) };
            if p.run_as.is_empty()
                || p.run_as.len() > 32
                || !p
                    .run_as
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                return Err(format!(
                    "policy.toml: phases.{name}.run_as {:?} is not a user name",
                    p.run_as
                ));
            }
            let enabled_until_ms = p
                .enabled_until
                .as_deref()
                .map(parse_rfc3339_ms)
                .transpose()
                .map_err(|e| format!("policy.toml: phases.{name}.enabled_until: {e}"))?;
            Ok(Some(PhaseRule {
                enabled: p.enabled,
                approval: p.approval,
                run_as: p.run_as,
                enabled_until_ms,
            }))
        };
        let phases = [
            phase("observe", file.phases.observe)?,
            phase("deploy", file.phases.deploy)?,
            phase("operate", file.phases.operate)?,
            phase("install", file.phases.install)?,
        ];
        let mut classify = Vec::with_capacity(file.classify.len());
        for (i, c) in file.classify.into_iter().enumerate() {
            let at = |e: String| format!("policy.toml: classify[{i}]: {e}");
            let (first, rest) = c
                .argv
                .split_first()
                .ok_or_else(|| at("argv is empty".into()))?;
            if first == "**" {
                return Err(at("argv[0] names the program; it cannot be **".into()));
            }
            let program = Pattern::new(first).map_err(at)?;
            let args = rest
                .iter()
                .map(|a| {
                    if a == "**" {
                        Ok(ArgPattern::Any)
                    } else {
                        Pattern::new(a).map(ArgPattern::One)
                    }
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(at)?;
            classify.push(Classify {
                program,
                args,
                phase: c.phase,
            });
        }
        let mut deny = Vec::with_capacity(file.deny.len());
        for (i, d) in file.deny.into_iter().enumerate() {
            let at = |e: String| format!("policy.toml: deny[{i}]: {e}");
            if d.program.is_empty() && d.any_arg.is_empty() {
                return Err(at("a deny rule needs program or any_arg".into()));
            }
            deny.push(Deny {
                program: d
                    .program
                    .iter()
                    .map(|p| Pattern::new(p))
                    .collect::<Result<_, _>>()
                    .map_err(at)?,
                any_arg: d
                    .any_arg
                    .iter()
                    .map(|p| Pattern::new(p))
                    .collect::<Result<_, _>>()
                    .map_err(at)?,
            });
        }
        Ok(Policy {
            sha256: sha256_hex(bytes),
            version,
            allow_same_uid: file.allow_same_uid,
            limits: Limits {
                clock_skew,
                max_approval_validity,
                allow_shell: file.limits.allow_shell,
            },
            phases,
            classify,
            deny,
        })
    }

    /// The rule of `phase`, `None` if the policy has no table for it (disabled).
    pub fn phase(&self, phase: Phase) -> Option<&PhaseRule> {
        self.phases[phase as usize].as_ref()
    }

    /// Whether `phase` is open at `now_ms`.
    pub fn is_open(&self, phase: Phase, now_ms: i64) -> bool {
        self.phase(phase)
            .is_some_and(|r| r.enabled && r.enabled_until_ms.is_none_or(|until| now_ms < until))
    }

    /// The first deny rule `cmd` meets, as text for the refusal.
    pub fn denied(&self, cmd: &Command<'_>) -> Option<String> {
        for d in &self.deny {
            if let Some(p) = d.program.iter().find(|p| p.matches_program(cmd.program)) {
                return Some(format!("{} matches deny program {:?}", cmd.program, p.text));
            }
            for arg in cmd.argv.iter().skip(1) {
                if let Some(p) = d.any_arg.iter().find(|p| p.matches_arg(arg)) {
                    return Some(format!(
                        "argument {arg:?} matches deny any_arg {:?}",
                        p.text
                    ));
                }
            }
        }
        None
    }

    /// The phase `cmd` falls in: the first matching rule's, else operate; never observe
    /// for a shell command.
    pub fn classify(&self, cmd: &Command<'_>) -> Phase {
        let phase = self
            .classify
            .iter()
            .find(|c| {
                c.program.matches_program(cmd.program)
                    && args_match(&c.args, cmd.argv.get(1..).unwrap_or(&[]))
            })
            .map_or(Phase::Operate, |c| c.phase);
        if cmd.shell && phase == Phase::Observe {
            Phase::Operate
        } else {
            phase
        }
    }

    /// Deny → classify → phase open: whether `cmd` may run at `now_ms`, in which phase,
    /// as whom, and whether it needs an approval.
    pub fn evaluate(&self, cmd: &Command<'_>, now_ms: i64) -> Result<Decision, Refusal> {
        if let Some(why) = self.denied(cmd) {
            return Err(Refusal::new(CommandFailure::DeniedByPolicy, why));
        }
        if cmd.shell && !self.limits.allow_shell {
            return Err(Refusal::new(
                CommandFailure::ShellNotAllowed,
                "the customer policy does not allow shell commands (limits.allow_shell)",
            ));
        }
        let phase = self.classify(cmd);
        let rule = match self.phase(phase) {
            Some(rule) if self.is_open(phase, now_ms) => rule,
            _ => {
                return Err(Refusal::new(
                    CommandFailure::PhaseDisabled,
                    format!("the customer policy has phase {phase} disabled"),
                ))
            }
        };
        Ok(Decision {
            phase,
            approval_required: rule.approval == ApprovalMode::Required,
            run_as: rule.run_as.clone(),
        })
    }

    /// One line per phase for `Status`: `observe=on/none,deploy=on/required,operate=on/required/until=…,install=off`.
    pub fn phases_summary(&self) -> String {
        Phase::ALL
            .iter()
            .map(|&p| match self.phase(p) {
                Some(r) if r.enabled => {
                    let mode = match r.approval {
                        ApprovalMode::None => "none",
                        ApprovalMode::Required => "required",
                    };
                    match r.enabled_until_ms {
                        Some(u) => format!("{p}=on/{mode}/until={}", crate::format_rfc3339_ms(u)),
                        None => format!("{p}=on/{mode}"),
                    }
                }
                _ => format!("{p}=off"),
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Whether `args` meet `patterns` (`**` takes any number of arguments).
fn args_match(patterns: &[ArgPattern], args: &[String]) -> bool {
    match patterns.split_first() {
        None => args.is_empty(),
        Some((ArgPattern::Any, rest)) => {
            (0..=args.len()).any(|skip| args_match(rest, &args[skip..]))
        }
        Some((ArgPattern::One(p), rest)) => match args.split_first() {
            Some((a, tail)) => p.matcher.is_match(a) && args_match(rest, tail),
            None => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
[phases.observe]
enabled = true
approval = "none"
run_as = "tether-observe"
[phases.operate]
enabled = true
approval = "required"
run_as = "tether-ops"
[phases.install]
enabled = false
approval = "required"
run_as = "tether-install"

[[classify]]
argv = ["systemctl", "status", "*"]
phase = "observe"
[[classify]]
argv = ["journalctl", "**"]
phase = "observe"
[[classify]]
argv = ["apt-get", "install", "**"]
phase = "install"

[[deny]]
program = ["rm", "mkfs*"]
[[deny]]
any_arg = ["/etc/tether-agent/**"]
"#;

    fn cmd<'a>(argv: &'a [String], program: &'a str) -> Command<'a> {
        Command {
            shell: false,
            argv,
            program,
        }
    }

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn classify_deny_and_phases() {
        let p = Policy::parse(POLICY.as_bytes()).unwrap();
        let now = 0;
        let d = p
            .evaluate(
                &cmd(&v(&["systemctl", "status", "x"]), "/usr/bin/systemctl"),
                now,
            )
            .unwrap();
        assert_eq!(
            (d.phase, d.approval_required, d.run_as.as_str()),
            (Phase::Observe, false, "tether-observe")
        );
        // One more argument than the rule has: not observe.
        let d = p
            .evaluate(
                &cmd(&v(&["systemctl", "status", "x", "y"]), "/usr/bin/systemctl"),
                now,
            )
            .unwrap();
        assert_eq!(d.phase, Phase::Operate);
        assert!(d.approval_required);
        let d = p
            .evaluate(&cmd(&v(&["journalctl"]), "/usr/bin/journalctl"), now)
            .unwrap();
        assert_eq!(d.phase, Phase::Observe);
        let d = p
            .evaluate(
                &cmd(
                    &v(&["journalctl", "-u", "x", "-n", "5"]),
                    "/usr/bin/journalctl",
                ),
                now,
            )
            .unwrap();
        assert_eq!(d.phase, Phase::Observe);
        // Install is disabled.
        let r = p
            .evaluate(
                &cmd(&v(&["apt-get", "install", "x"]), "/usr/bin/apt-get"),
                now,
            )
            .unwrap_err();
        assert_eq!(r.code, CommandFailure::PhaseDisabled);
        // Deny by the resolved path's file name, whatever argv[0] said.
        let r = p
            .evaluate(
                &cmd(&v(&["/usr/bin/../bin/rm", "-rf", "/"]), "/usr/bin/rm"),
                now,
            )
            .unwrap_err();
        assert_eq!(r.code, CommandFailure::DeniedByPolicy);
        let r = p
            .evaluate(
                &cmd(&v(&["cat", "/etc/x/../tether-agent/k"]), "/usr/bin/cat"),
                now,
            )
            .unwrap_err();
        assert_eq!(r.code, CommandFailure::DeniedByPolicy);
        // A shell command is never observe, and needs allow_shell.
        let sh = Command {
            shell: true,
            argv: &v(&["systemctl", "status", "x"]),
            program: "/usr/bin/systemctl",
        };
        assert_eq!(p.classify(&sh), Phase::Operate);
        assert_eq!(
            p.evaluate(&sh, now).unwrap_err().code,
            CommandFailure::ShellNotAllowed
        );
        assert_eq!(
            p.phases_summary(),
            "observe=on/none,deploy=off,operate=on/required,install=off"
        );
    }

    #[test]
    fn enabled_until_closes_the_phase() {
        let text = POLICY.replace(
            "run_as = \"tether-ops\"",
            "run_as = \"tether-ops\"\nenabled_until = \"2026-12-01T18:00:00Z\"",
        );
        let p = Policy::parse(text.as_bytes()).unwrap();
        let until = parse_rfc3339_ms("2026-12-01T18:00:00Z").unwrap();
        assert!(p.is_open(Phase::Operate, until - 1));
        assert!(!p.is_open(Phase::Operate, until));
    }

    #[test]
    fn broken_policies_are_refused_whole() {
        for bad in [
            "[phases.observe]\nenabled = true\napproval = \"maybe\"\nrun_as = \"x\"\n",
            "[phases.observe]\nenabled = true\napproval = \"none\"\n",
            "[phases.observe]\nenabled = true\napproval = \"none\"\nrun_as = \"a b\"\n",
            "[[deny]]\n",
            "[[classify]]\nargv = []\nphase = \"observe\"\n",
            "[[classify]]\nargv = [\"**\"]\nphase = \"observe\"\n",
            "[[classify]]\nargv = [\"a\"]\nphase = \"root\"\n",
            "unknown = 1\n",
            "version = 2\n",
            "[limits]\nclock_skew = \"10m\"\n",
            "[limits]\nmax_approval_validity = \"2d\"\n",
        ] {
            assert!(Policy::parse(bad.as_bytes()).is_err(), "{bad}");
        }
        let empty = Policy::parse(b"").unwrap();
        assert!(!empty.is_open(Phase::Observe, 0));
    }
}
