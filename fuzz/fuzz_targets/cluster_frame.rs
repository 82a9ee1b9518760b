//! Cluster channel frames (`tether_proto::cluster::decode`) as a broker and control read
//! them off the channel, and the allowlist messages among them through the broker's sync
//! state machine (`channel::SyncState`) into an `Allowlist`.
//!
//! Input: a stream of frames, each a 4-byte big-endian length and that many bytes of JSON
//! (as the channel's length-delimited codec cuts them). Checks: never panics; each
//! message decoded re-encodes to a frame that decodes equal; the broker applies deltas
//! only in version order, and the allowlist then holds the version applied.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_broker::allowlist::{Allowlist, Change};
use tether_broker::channel::{DigestLog, SyncState, SyncStep};
use tether_proto::cluster::{decode, encode, ToBroker, ToControl};

fuzz_target!(|data: &[u8]| {
    let list = Allowlist::new();
    let mut log = DigestLog::default();
    let mut sync = SyncState::default();
    let mut rest = data;
    while rest.len() >= 4 {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let Some(body) = rest.get(4..4 + len) else {
            return;
        };
        rest = &rest[4 + len..];
        if let Ok(msg) = decode::<ToControl>(body) {
            let frame = encode(&msg).expect("a decoded message encodes");
            assert_eq!(decode::<ToControl>(&frame[4..]).as_ref(), Ok(&msg));
        }
        let Ok(msg) = decode::<ToBroker>(body) else {
            continue;
        };
        let frame = encode(&msg).expect("a decoded message encodes");
        assert_eq!(decode::<ToBroker>(&frame[4..]).as_ref(), Ok(&msg));

        let current = list.snapshot().version();
        match sync.handle(msg, current, &log) {
            Ok(SyncStep::Apply(change)) => {
                let version = match &change {
                    Change::Delta { version, .. } => {
                        assert_eq!(*version, Some(current + 1), "a delta out of order");
                        *version
                    }
                    Change::Replace { version, .. } => *version,
                };
                if list.apply(change).is_ok() {
                    sync.applied(&mut log);
                    if let Some(v) = version {
                        assert_eq!(list.snapshot().version(), v);
                    }
                }
            }
            Ok(SyncStep::Duplicate { version }) => assert!(version <= current),
            Ok(SyncStep::Continue) | Err(_) => {}
        }
    }
});
