//! Progress bars (indicatif) on stderr, or none with `--no-progress` or when stderr is
//! not a terminal (CI logs stay readable).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Makes progress bars, all visible or all hidden.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    visible: bool,
}

impl Progress {
    /// Visible unless `off` or stderr is not a terminal.
    pub fn new(off: bool) -> Progress {
        use std::io::IsTerminal;
        Progress {
            visible: !off && std::io::stderr().is_terminal(),
        }
    }

    /// A bar of `len` steps labelled `what`.
    pub fn bar(&self, len: u64, what: &str) -> ProgressBar {
        let bar = ProgressBar::with_draw_target(
            Some(len),
            if self.visible {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>24} [{bar:40}] {pos}/{len} ({per_sec}, {elapsed}) {prefix}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(what.to_owned());
        bar
    }
}
