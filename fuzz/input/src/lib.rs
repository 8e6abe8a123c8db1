//! What the fuzz targets share with the seed generator: the keys frames are
//! sealed under, and the input format of the `array` target, which drives
//! the simulated array's whole command handler with a script of commands.
//!
//! # The `array` script
//!
//! A sequence of commands, each:
//!
//! ```text
//! byte 0      bits 0-1 initiator (3 logged in; 3 wraps to 0)
//!             bits 2-3 LUN: 0, 1 (the STG's members), 2 (a plain LUN), 9 (none)
//!             bits 4-5 data direction: none, in, out, as the array derives it
//!             bit  6   a handle slot byte follows: bytes 2-5 of the CDB are
//!                      replaced by a binding handle an earlier BIND returned
//! [slot]      which remembered handle (modulo their number)
//! len         CDB length (modulo 17; an empty CDB is skipped)
//! cdb         that many bytes (fewer if the script ends)
//! buf         u16 big-endian: the data buffer's length
//! data-out    with direction out, that many bytes (zeros past the script's end)
//! ```
//!
//! Binding handles are random, so a fuzzer could never guess one; slot
//! references let it reach every vendor command on a live binding.

use std::sync::{Arc, Mutex};

use scsi::{DataDirection, ScsiStatus, Sense};
use sim_target::{Array, LunConfig, Reply, StgMailbox, StgSpec, Task, TaskResult};
use stp_core::auth::FrameKey;
use stp_core::vendor::{self, BindResult};

/// The session key every fuzzed frame is sealed under.
pub const KEY: [u8; 32] = [7; 32];
/// The connection id of the fuzzed frames' cipher.
pub const CONN_ID: u64 = 0x5354_5046_0000_0001;

/// The session key as a [`FrameKey`].
pub fn frame_key() -> FrameKey {
    FrameKey::from_bytes(KEY)
}

/// The STG id of the array target's mailbox.
pub const STG_ID: u32 = 1;
/// LUN numbers the header's LUN bits select.
pub const LUNS: [u64; 4] = [0, 1, 2, 9];
/// The most binding handles remembered.
const MAX_HANDLES: usize = 64;

/// One command of an `array` script, for writing seeds.
#[derive(Clone, Debug, Default)]
pub struct Command {
    /// Initiator 0-2.
    pub initiator: u8,
    /// Index into [`LUNS`].
    pub lun: u8,
    /// 0 none, 1 in, 2 out, 3 derived.
    pub direction: u8,
    /// A remembered handle to put in CDB bytes 2-5.
    pub handle_slot: Option<u8>,
    /// The CDB.
    pub cdb: Vec<u8>,
    /// Data buffer length.
    pub buf_len: u16,
    /// Data-out bytes (direction out).
    pub data: Vec<u8>,
}

impl Command {
    /// Appends the command's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut h = (self.initiator & 3) | (self.lun & 3) << 2 | (self.direction & 3) << 4;
        if self.handle_slot.is_some() {
            h |= 0x40;
        }
        out.push(h);
        if let Some(s) = self.handle_slot {
            out.push(s);
        }
        out.push(self.cdb.len() as u8);
        out.extend_from_slice(&self.cdb);
        out.extend_from_slice(&self.buf_len.to_be_bytes());
        if self.direction == 2 {
            let mut d = self.data.clone();
            d.resize(self.buf_len as usize, 0);
            out.extend_from_slice(&d);
        }
    }
}

/// Encodes a whole script.
pub fn encode_script(cmds: &[Command]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in cmds {
        c.encode(&mut out);
    }
    out
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
}

type Outcome = Arc<Mutex<Option<(TaskResult, Vec<u8>)>>>;

/// A reply over plain vectors that records its completion.
struct ScriptReply {
    direction: DataDirection,
    buf: Vec<u8>,
    done: Outcome,
}

impl Reply for ScriptReply {
    fn data_len(&self) -> usize {
        match self.direction {
            DataDirection::None => 0,
            _ => self.buf.len(),
        }
    }

    fn read_out(&self, offset: usize, dst: &mut [u8]) -> usize {
        if self.direction != DataDirection::ToDevice {
            return 0;
        }
        let src = &self.buf[offset.min(self.buf.len())..];
        let n = src.len().min(dst.len());
        dst[..n].copy_from_slice(&src[..n]);
        n
    }

    fn write_in(&mut self, offset: usize, src: &[u8]) -> usize {
        if self.direction != DataDirection::FromDevice {
            return 0;
        }
        let at = offset.min(self.buf.len());
        let dst = &mut self.buf[at..];
        let n = src.len().min(dst.len());
        dst[..n].copy_from_slice(&src[..n]);
        n
    }

    fn complete(self: Box<Self>, result: TaskResult) {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        assert!(done.is_none(), "a task completed twice");
        *done = Some((result, self.buf));
    }
}

/// The small array the `array` target drives: LUNs 0 and 1 (512-byte
/// blocks) form STG [`STG_ID`] behind a vendor-mode mailbox, LUN 2 is a
/// plain LUN with 4096-byte blocks; three initiators are logged in.
pub fn small_array() -> (Array, Arc<StgMailbox>) {
    let array = Array::new();
    array
        .add_lun(0, LunConfig::new(0, 256, 512))
        .expect("LUN 0");
    array
        .add_lun(1, LunConfig::new(1, 256, 512))
        .expect("LUN 1");
    array
        .add_lun(2, LunConfig::new(2, 64, 4096))
        .expect("LUN 2");
    let mut spec = StgSpec::new(STG_ID, vec![0, 1]);
    // Small frames and queues, so a script reaches the limits.
    spec.max_payload = 16 << 10;
    spec.queue_bytes = 64 << 10;
    spec.queue_frames = 16;
    let mailbox = StgMailbox::with_seed(&array, vec![spec], 1).expect("the STG");
    mailbox.install(&array);
    (array, mailbox)
}

/// Runs an `array` script on a fresh [`small_array`], checking after each
/// command what every target must guarantee: a command completes once,
/// at once unless it is a RECEIVE the mailbox holds; CHECK CONDITION
/// carries sense and nothing else does; no more data-in than the buffer
/// holds; sense survives its own encoding.
pub fn run_array_script(script: &[u8]) {
    let (array, mailbox) = small_array();
    let initiators = [
        array.login("fuzz-a"),
        array.login("fuzz-b"),
        array.login("fuzz-c"),
    ];
    let mut handles: Vec<u32> = Vec::new();
    let mut held = Vec::new();
    let mut c = Cursor(script);
    while let Some(h) = c.byte() {
        let initiator = initiators[usize::from(h & 3) % 3];
        let lun = LUNS[usize::from(h >> 2 & 3)];
        let slot = if h & 0x40 != 0 { c.byte() } else { None };
        let Some(len) = c.byte() else { break };
        let mut cdb = c.take(usize::from(len % 17)).to_vec();
        if let (Some(slot), false, true) = (slot, handles.is_empty(), cdb.len() >= 6) {
            let handle = handles[usize::from(slot) % handles.len()];
            cdb[2..6].copy_from_slice(&handle.to_be_bytes());
        }
        let buf_len = {
            let b = c.take(2);
            usize::from(u16::from_be_bytes([
                b.first().copied().unwrap_or(0),
                b.get(1).copied().unwrap_or(0),
            ]))
        };
        let direction = match h >> 4 & 3 {
            0 => DataDirection::None,
            1 => DataDirection::FromDevice,
            2 => DataDirection::ToDevice,
            _ => array.direction_of(&cdb).unwrap_or(DataDirection::None),
        };
        let buf = if direction == DataDirection::ToDevice && h >> 4 & 3 == 2 {
            let mut d = c.take(buf_len).to_vec();
            d.resize(buf_len, 0);
            d
        } else {
            vec![0u8; buf_len]
        };
        let Some(cdb_buf) = scsi::CdbBuf::new(&cdb) else {
            continue;
        };
        let done: Outcome = Arc::default();
        array.submit(Task {
            initiator,
            lun,
            cdb: cdb_buf,
            direction,
            reply: Box::new(ScriptReply {
                direction,
                buf,
                done: Arc::clone(&done),
            }),
        });
        let outcome = done.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some((result, data)) = outcome else {
            assert_eq!(
                cdb.first().copied(),
                Some(vendor::RECEIVE.0),
                "only a RECEIVE may be held: {cdb:02x?}"
            );
            held.push(done);
            continue;
        };
        check_result(&result, &data, direction);
        if cdb.first() == Some(&vendor::BIND.0) && result.status == ScsiStatus::GOOD {
            if let Ok(b) = BindResult::parse(&data[..result.data_in.min(data.len())]) {
                if handles.len() < MAX_HANDLES {
                    handles.push(b.handle);
                }
            }
        }
    }
    // Held RECEIVEs complete (or are dropped) when the mailbox goes.
    drop(array);
    drop(mailbox);
    for done in held {
        if let Some((result, data)) = done.lock().unwrap_or_else(|e| e.into_inner()).take() {
            check_result(&result, &data, DataDirection::FromDevice);
        }
    }
}

fn check_result(result: &TaskResult, data: &[u8], direction: DataDirection) {
    assert_eq!(
        result.status == ScsiStatus::CHECK_CONDITION,
        result.sense.is_some(),
        "sense with CHECK CONDITION and only then: {result:?}"
    );
    if direction == DataDirection::FromDevice {
        assert!(result.data_in <= data.len(), "{result:?}");
    } else {
        assert_eq!(result.data_in, 0, "data-in without a data-in buffer");
    }
    if let Some(sense) = &result.sense {
        let again = Sense::parse(&sense.to_descriptor()).expect("the array's sense parses");
        assert_eq!(
            again,
            Sense {
                format: scsi::sense::SenseFormat::Descriptor,
                ..sense.clone()
            }
        );
    }
}
