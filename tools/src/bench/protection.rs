//! `stp bench protection`: the per-byte cost, on one core, of each
//! candidate for STP's frame protection, and of the per-side work of each
//! protocol version (docs/PERFORMANCE.md, "Frame protection: the
//! candidates, measured").
//!
//! Every case processes `--size` payload bytes per call (at most one frame's
//! payload, [`MAX_PAYLOAD`]) on the calling thread. A case runs for
//! `--seconds` of timed calls per round; rounds are interleaved (every case
//! once, in order, then every case again), so a burst of load from
//! elsewhere lands on one round of a case and not on all of them. The
//! report gives each case's median round and the spread.
//!
//! Only the call itself is timed, by this thread's CPU clock
//! (`CLOCK_THREAD_CPUTIME_ID`): GB/s are bytes per second of one busy core,
//! which time the thread spent waiting for a CPU shared with other work
//! does not dilute. The wall-clock rate is reported next to it. Work a case
//! needs before each call (sealing the buffer an open consumes) runs
//! untimed, outside the clock.
//! Results pass through [`black_box`], so nothing is optimised away.
//!
//! Every AEAD key is fresh from the system's random source and owns a nonce
//! counter ([`CountedKey`]): no nonce repeats under one key.
//!
//! The composites model one side of a frame's journey:
//!
//! * `stp-v2-send`: copy the payload from the caller's buffer into the
//!   frame buffer, AES-256-GCM seal it in place with the 80-byte header as
//!   AAD, CRC32C over the header;
//! * `stp-v2-recv`: CRC32C check of the header, AES-256-GCM open in place,
//!   copy the payload out to the caller's buffer;
//! * `stp-v1-send` / `stp-v1-recv`: the same copies around protocol v1's
//!   protection (keyed BLAKE3 tag, then CRC32C over the 72-byte header and
//!   the payload), kept here as a model of the superseded version.
//!
//! The v2 frame layout here ([`V2_HEADER_LEN`], the nonce and CRC fields, a
//! tag after the payload) is a model for costing, not the wire
//! specification; its per-byte work is what the v2 design does.

use std::hint::black_box;
use std::ops::Range;
use std::time::Instant;

use nix::time::{clock_gettime, ClockId};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use ring::aead::{self, Aad, LessSafeKey, Nonce, Tag, UnboundKey, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use stp_core::frame::Protection;
use stp_core::wire::MAX_PAYLOAD;

/// Protocol v1's header length (its frames are refused since v2).
const V1_HEADER_LEN: usize = 72;
/// Protocol v1's CRC field and tag, in its header.
const V1_CRC: Range<usize> = 48..52;
const V1_TAG: Range<usize> = 56..72;

/// A v1 frame key (32 bytes, keyed BLAKE3).
struct FrameKey([u8; 32]);

impl FrameKey {
    fn from_bytes(b: [u8; 32]) -> FrameKey {
        FrameKey(b)
    }
}

/// The version of `stp bench protection --json`'s shape.
pub const PROTECTION_SCHEMA: u32 = 1;

/// The v2 header: 80 bytes, authenticated as AAD, covered by its CRC32C.
pub const V2_HEADER_LEN: usize = 80;
/// Where the modelled v2 header carries the AEAD nonce.
const V2_NONCE: Range<usize> = 8..8 + NONCE_LEN;
/// Where the modelled v2 header carries the payload length.
const V2_LEN: Range<usize> = 20..24;
/// Where the modelled v2 header carries its CRC32C (zero while computed).
const V2_CRC: Range<usize> = 76..80;
/// The AEAD tag, after the payload in the modelled v2 frame.
pub const TAG_LEN: usize = aead::MAX_TAG_LEN;

/// The longest `--seconds` accepted.
const MAX_SECONDS: f64 = 3600.0;

/// One measured operation.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Case {
    /// Copy between two buffers.
    #[value(name = "memcpy")]
    Memcpy,
    /// CRC32C (`crc32c` crate).
    #[value(name = "crc32c")]
    Crc32c,
    /// Keyed BLAKE3 (`blake3`).
    #[value(name = "blake3-keyed")]
    Blake3Keyed,
    /// AES-256-GCM seal in place, 80-byte AAD (`ring`).
    #[value(name = "aes256gcm-seal")]
    Aes256GcmSeal,
    /// AES-256-GCM open in place of a sealed buffer (`ring`).
    #[value(name = "aes256gcm-open")]
    Aes256GcmOpen,
    /// ChaCha20-Poly1305 seal in place, 80-byte AAD (`ring`).
    #[value(name = "chacha20poly1305-seal")]
    Chacha20Poly1305Seal,
    /// AES-256-GCM with the buffer as AAD and no plaintext (`ring`).
    #[value(name = "gmac")]
    Gmac,
    /// STP v2, sending side.
    #[value(name = "stp-v2-send")]
    StpV2Send,
    /// STP v2, receiving side.
    #[value(name = "stp-v2-recv")]
    StpV2Recv,
    /// STP v1 (today's frames), sending side.
    #[value(name = "stp-v1-send")]
    StpV1Send,
    /// STP v1, receiving side.
    #[value(name = "stp-v1-recv")]
    StpV1Recv,
}

impl Case {
    /// Every case, in the order they run.
    pub const ALL: [Case; 11] = [
        Case::Memcpy,
        Case::Crc32c,
        Case::Blake3Keyed,
        Case::Aes256GcmSeal,
        Case::Aes256GcmOpen,
        Case::Chacha20Poly1305Seal,
        Case::Gmac,
        Case::StpV2Send,
        Case::StpV2Recv,
        Case::StpV1Send,
        Case::StpV1Recv,
    ];

    /// The name on the command line and in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Case::Memcpy => "memcpy",
            Case::Crc32c => "crc32c",
            Case::Blake3Keyed => "blake3-keyed",
            Case::Aes256GcmSeal => "aes256gcm-seal",
            Case::Aes256GcmOpen => "aes256gcm-open",
            Case::Chacha20Poly1305Seal => "chacha20poly1305-seal",
            Case::Gmac => "gmac",
            Case::StpV2Send => "stp-v2-send",
            Case::StpV2Recv => "stp-v2-recv",
            Case::StpV1Send => "stp-v1-send",
            Case::StpV1Recv => "stp-v1-recv",
        }
    }

    /// What one call does.
    pub fn what(self) -> &'static str {
        match self {
            Case::Memcpy => "copy the buffer into another (copy_from_slice)",
            Case::Crc32c => "CRC32C of the buffer (crc32c crate)",
            Case::Blake3Keyed => "keyed BLAKE3 of the buffer (blake3, one thread)",
            Case::Aes256GcmSeal => {
                "AES-256-GCM seal in place, 80-byte header as AAD (ring seal_in_place_separate_tag)"
            }
            Case::Aes256GcmOpen => {
                "AES-256-GCM open in place of a sealed buffer, tag verified (ring open_in_place_separate_tag)"
            }
            Case::Chacha20Poly1305Seal => {
                "ChaCha20-Poly1305 seal in place, 80-byte header as AAD (ring)"
            }
            Case::Gmac => "AES-256-GCM tag over the buffer as AAD, empty plaintext (ring)",
            Case::StpV2Send => {
                "v2 send: copy payload into the frame, AES-256-GCM seal in place (80-byte header as AAD), CRC32C of the header"
            }
            Case::StpV2Recv => {
                "v2 receive: CRC32C check of the header, AES-256-GCM open in place, copy payload out"
            }
            Case::StpV1Send => {
                "v1 send: copy payload into the frame, stp_core::frame::seal (keyed BLAKE3 + CRC32C over header and payload)"
            }
            Case::StpV1Recv => {
                "v1 receive: stp_core::frame::open (CRC32C + keyed BLAKE3 over header and payload), copy payload out"
            }
        }
    }
}

/// Options of `stp bench protection`.
#[derive(Args, Debug, Clone)]
#[command(after_help = "Example: stp bench protection --rounds 3 --json\n\n\
One thread. Each round runs every case for --seconds of timed calls, in order;\n\
the report gives each case's median round (and min/max). GB/s and MB/s are\n\
10^9 and 10^6 payload bytes per second. Build with --release for figures worth\n\
quoting.")]
pub struct ProtectionArgs {
    /// Payload bytes per call (at most 1 MiB, the largest frame payload).
    #[arg(long, default_value = "1m", value_parser = parse_frame_size)]
    pub size: usize,
    /// Seconds of timed calls per case and round (fractions allowed: 0.25).
    #[arg(long, default_value = "1", value_parser = parse_seconds)]
    pub seconds: f64,
    /// Rounds; each runs every case once, in order.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rounds: u32,
    /// Cases to run, comma-separated (default: all, in the order listed).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub cases: Vec<Case>,
    /// Print one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// `--size`: a size from 1 byte to one frame's payload.
fn parse_frame_size(s: &str) -> Result<usize, String> {
    let n = super::units::parse_nonzero_size(s)?;
    if n > u64::from(MAX_PAYLOAD) {
        return Err(format!(
            "`{s}` is more than one frame's payload ({MAX_PAYLOAD} bytes, 1 MiB); give at most 1m"
        ));
    }
    usize::try_from(n).map_err(|_| format!("`{s}` does not fit in memory here"))
}

/// `--seconds`: a positive number of seconds, fractions allowed.
fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds; write e.g. 1, 0.25 or 2.5"))?;
    if !v.is_finite() || v <= 0.0 || v > MAX_SECONDS {
        return Err(format!(
            "`{s}`: seconds per case must be more than 0 and at most {MAX_SECONDS}"
        ));
    }
    Ok(v)
}

/// The CPU the figures come from.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuInfo {
    /// `/proc/cpuinfo`'s first `model name` (null where it has none).
    pub model: Option<String>,
    /// The architecture this binary was built for.
    pub arch: String,
    /// x86 AES-NI (`aes` flag).
    pub aes_ni: bool,
    /// x86 vector AES (`vaes`).
    pub vaes: bool,
    /// x86 carry-less multiply (`pclmulqdq`), which GHASH uses.
    pub pclmulqdq: bool,
    /// x86 vector carry-less multiply (`vpclmulqdq`).
    pub vpclmulqdq: bool,
    /// x86 SHA extensions (`sha_ni`).
    pub sha_ni: bool,
    /// AVX2.
    pub avx2: bool,
    /// AVX-512 Foundation (`avx512f`).
    pub avx512f: bool,
}

impl CpuInfo {
    /// Reads `/proc/cpuinfo` (all false and no model where it cannot).
    pub fn here() -> CpuInfo {
        CpuInfo::parse(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
    }

    /// Parses `/proc/cpuinfo` text: the first processor's model and flags.
    pub fn parse(text: &str) -> CpuInfo {
        let field = |name: &str| {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == name).then(|| v.trim().to_string())
            })
        };
        let flags = field("flags").unwrap_or_default();
        let has = |f: &str| flags.split_whitespace().any(|x| x == f);
        CpuInfo {
            model: field("model name").filter(|m| !m.is_empty()),
            arch: std::env::consts::ARCH.into(),
            aes_ni: has("aes"),
            vaes: has("vaes"),
            pclmulqdq: has("pclmulqdq"),
            vpclmulqdq: has("vpclmulqdq"),
            sha_ni: has("sha_ni"),
            avx2: has("avx2"),
            avx512f: has("avx512f"),
        }
    }

    /// `aes-ni yes, vaes no, ...` for the text report.
    fn flags_text(&self) -> String {
        let yn = |b: bool| if b { "yes" } else { "no" };
        format!(
            "aes-ni {}, vaes {}, pclmulqdq {}, vpclmulqdq {}, sha-ni {}, avx2 {}, avx-512f {}",
            yn(self.aes_ni),
            yn(self.vaes),
            yn(self.pclmulqdq),
            yn(self.vpclmulqdq),
            yn(self.sha_ni),
            yn(self.avx2),
            yn(self.avx512f)
        )
    }
}

/// One case's figures over every round.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CaseResult {
    /// [`Case::name`].
    pub name: String,
    /// [`Case::what`].
    pub what: String,
    /// The median round's rate, 10^9 payload bytes per CPU second of this
    /// thread (one busy core).
    pub median_gbps: f64,
    /// The same in 10^6 bytes per second.
    pub median_mbps: f64,
    /// The slowest round.
    pub min_gbps: f64,
    /// The fastest round.
    pub max_gbps: f64,
    /// Every round's rate, in round order.
    pub rounds_gbps: Vec<f64>,
    /// The median round's rate by the wall clock (lower than
    /// `median_gbps` when the thread waited for a CPU).
    pub median_wall_gbps: f64,
    /// Every round's wall-clock rate.
    pub rounds_wall_gbps: Vec<f64>,
    /// Payload bytes processed, all rounds.
    pub bytes: u64,
    /// Calls timed, all rounds.
    pub ops: u64,
    /// CPU seconds of the timed calls, all rounds.
    pub seconds: f64,
    /// Wall-clock seconds of the timed calls, all rounds.
    pub wall_seconds: f64,
    /// `seconds / wall_seconds`: the share of a CPU the thread got while
    /// timed (below about 0.95, other work took the core).
    pub cpu_share: f64,
    /// CPU seconds per 10^9 bytes at the median rate (one core busy).
    pub cpu_s_per_gb: f64,
}

/// The whole run (`--json`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ProtectionReport {
    /// [`PROTECTION_SCHEMA`].
    pub schema: u32,
    /// `protection`.
    pub mode: String,
    /// Where it ran.
    pub cpu: CpuInfo,
    /// `release` or `debug` (debug figures mean little).
    pub build: String,
    /// Threads used: 1.
    pub threads: u32,
    /// Payload bytes per call.
    pub size: u64,
    /// Bytes of AAD (the v2 header) in the AEAD seal and open cases.
    pub aad_bytes: u64,
    /// Timed seconds per case and round.
    pub seconds_per_case: f64,
    /// Rounds run.
    pub rounds: u32,
    /// Every case, in run order.
    pub cases: Vec<CaseResult>,
}

impl ProtectionReport {
    /// The result for case `name`.
    pub fn case(&self, name: &str) -> Option<&CaseResult> {
        self.cases.iter().find(|c| c.name == name)
    }
}

/// Today's frames (protocol v1): keyed BLAKE3 tag, then CRC32C, both over
/// header and payload; payload in clear.
pub const V1_PROTECTION: &str = "blake3-keyed+crc32c";
/// Protocol v2's default: AES-256-GCM over the payload with the header as
/// AAD, CRC32C over the header.
pub const V2_PROTECTION: &str = Protection::Encrypt.name();
/// Protocol v2's authentication-only setting: keyed BLAKE3 over header and
/// payload (payload in clear), CRC32C over the header.
pub const V2_AUTH_ONLY: &str = Protection::Authenticate.name();

/// An AEAD key that owns its nonce counter: each seal takes the next
/// counter value as its nonce (4 zero bytes, then the counter big-endian),
/// so no nonce repeats under the key. The counter refuses to wrap.
pub struct CountedKey {
    key: LessSafeKey,
    next: u64,
}

impl CountedKey {
    /// A fresh random key for `alg`.
    pub fn random(alg: &'static aead::Algorithm, rng: &dyn SecureRandom) -> Result<CountedKey> {
        let mut bytes = vec![0u8; alg.key_len()];
        rng.fill(&mut bytes)
            .map_err(|_| anyhow!("the system random source failed; cannot make a key"))?;
        let key = UnboundKey::new(alg, &bytes)
            .map_err(|_| anyhow!("ring rejected a {}-byte key", bytes.len()))?;
        Ok(CountedKey {
            key: LessSafeKey::new(key),
            next: 0,
        })
    }

    /// The next nonce; an error once the counter is spent.
    fn next_nonce(&mut self) -> Result<[u8; NONCE_LEN]> {
        let n = self.next;
        self.next = n.checked_add(1).ok_or_else(|| {
            anyhow!("nonce counter exhausted under one key (2^64 - 1 seals); use a new key")
        })?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce[NONCE_LEN - 8..].copy_from_slice(&n.to_be_bytes());
        Ok(nonce)
    }

    /// Seals `payload` in place: stores the next nonce in `header`, zeroes
    /// its CRC field, and authenticates the whole header as AAD. Returns
    /// the tag.
    pub fn seal(&mut self, header: &mut [u8; V2_HEADER_LEN], payload: &mut [u8]) -> Result<Tag> {
        let nonce = self.next_nonce()?;
        header[V2_NONCE].copy_from_slice(&nonce);
        header[V2_CRC].fill(0);
        self.key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&header[..]),
                payload,
            )
            .map_err(|_| {
                anyhow!(
                    "sealing {} bytes failed (too long for the cipher)",
                    payload.len()
                )
            })
    }

    /// Opens `payload` in place under the nonce `header` carries, with
    /// `header` (CRC field zero) as AAD. An error if the tag does not match.
    pub fn open<'a>(
        &self,
        header: &[u8; V2_HEADER_LEN],
        tag: Tag,
        payload: &'a mut [u8],
    ) -> Result<&'a mut [u8]> {
        let nonce = Nonce::try_assume_unique_for_key(&header[V2_NONCE])
            .map_err(|_| anyhow!("the header's nonce field is not {NONCE_LEN} bytes"))?;
        self.key
            .open_in_place_separate_tag(nonce, Aad::from(&header[..]), tag, payload, 0..)
            .map_err(|_| {
                anyhow!("authentication failed: the sealed bytes, header or tag were changed")
            })
    }

    /// The tag over `data` as AAD with an empty plaintext (GMAC).
    pub fn gmac(&mut self, data: &[u8]) -> Result<Tag> {
        let nonce = self.next_nonce()?;
        self.key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(data),
                &mut [],
            )
            .map_err(|_| anyhow!("GMAC over {} bytes failed", data.len()))
    }
}

/// A v2 frame as modelled here: header ‖ payload ‖ tag.
fn v2_frame(size: usize) -> Vec<u8> {
    vec![0u8; V2_HEADER_LEN + size + TAG_LEN]
}

/// v2 send: copies `src` into `frame`'s payload, seals it in place under
/// `key` with the header as AAD, appends the tag, then sets the header's
/// CRC32C.
fn v2_send(key: &mut CountedKey, frame: &mut [u8], src: &[u8]) -> Result<()> {
    let (head, rest) = frame
        .split_first_chunk_mut::<V2_HEADER_LEN>()
        .context("frame buffer shorter than a v2 header")?;
    if rest.len() != src.len() + TAG_LEN {
        bail!(
            "frame buffer holds {} bytes after the header; a {}-byte payload needs {}",
            rest.len(),
            src.len(),
            src.len() + TAG_LEN
        );
    }
    let (payload, tag_out) = rest.split_at_mut(src.len());
    head[..4].copy_from_slice(b"STPF");
    head[4] = 2;
    head[V2_LEN].copy_from_slice(&(src.len() as u32).to_be_bytes());
    payload.copy_from_slice(src);
    let tag = key.seal(head, payload)?;
    tag_out.copy_from_slice(tag.as_ref());
    let crc = crc32c::crc32c(&head[..]);
    head[V2_CRC].copy_from_slice(&crc.to_be_bytes());
    Ok(())
}

/// v2 receive: checks the header's CRC32C, opens the payload in place and
/// copies it to `out`.
fn v2_recv(key: &CountedKey, frame: &mut [u8], out: &mut [u8]) -> Result<()> {
    let (head, rest) = frame
        .split_first_chunk_mut::<V2_HEADER_LEN>()
        .context("frame shorter than a v2 header")?;
    let mut aad = *head;
    aad[V2_CRC].fill(0);
    let carried = u32::from_be_bytes(head[V2_CRC].try_into()?);
    let got = crc32c::crc32c(&aad);
    if got != carried {
        bail!("header CRC32C mismatch: carries 0x{carried:08x}, computes to 0x{got:08x}");
    }
    let len = u32::from_be_bytes(aad[V2_LEN].try_into()?) as usize;
    if len != out.len() || rest.len() != len + TAG_LEN {
        bail!(
            "header says {len} payload bytes; the frame holds {} and the reader wants {}",
            rest.len().saturating_sub(TAG_LEN),
            out.len()
        );
    }
    let (payload, tag) = rest.split_at_mut(len);
    let tag = Tag::try_from(&tag[..]).map_err(|_| anyhow!("tag is not {TAG_LEN} bytes"))?;
    let plain = key.open(&aad, tag, payload)?;
    out.copy_from_slice(plain);
    Ok(())
}

/// v1 send: copies `src` into `frame`'s payload and seals it as protocol
/// v1 did: keyed BLAKE3 over the header (CRC and tag zero) and payload,
/// truncated to 16 bytes, then CRC32C over header and payload.
fn v1_send(key: &FrameKey, seq: u64, frame: &mut [u8], src: &[u8]) -> Result<()> {
    let (head, payload) = frame.split_at_mut(V1_HEADER_LEN.min(frame.len()));
    if payload.len() != src.len() || head.len() != V1_HEADER_LEN {
        bail!(
            "frame buffer holds {} payload bytes, not {}",
            payload.len(),
            src.len()
        );
    }
    payload.copy_from_slice(src);
    head.fill(0);
    head[..4].copy_from_slice(b"STPF");
    head[4] = 1;
    head[5] = 4; // DATA
    head[24..32].copy_from_slice(&seq.to_be_bytes());
    head[44..48].copy_from_slice(&(src.len() as u32).to_be_bytes());
    let tag = v1_tag(key, head, payload);
    head[V1_TAG].copy_from_slice(&tag);
    let crc = crc32c::crc32c_append(crc32c::crc32c(head), payload);
    head[V1_CRC].copy_from_slice(&crc.to_be_bytes());
    Ok(())
}

fn v1_tag(key: &FrameKey, head: &[u8], payload: &[u8]) -> [u8; 16] {
    let mut zeroed = [0u8; V1_HEADER_LEN];
    zeroed.copy_from_slice(head);
    zeroed[V1_CRC].fill(0);
    zeroed[V1_TAG].fill(0);
    let mut mac = blake3::Hasher::new_keyed(&key.0);
    mac.update(&zeroed);
    mac.update(payload);
    let mut tag = [0u8; 16];
    mac.finalize_xof().fill(&mut tag);
    tag
}

/// v1 receive: checks the CRC32C, then the tag, then copies the payload to
/// `out`.
fn v1_recv(key: &FrameKey, frame: &[u8], out: &mut [u8]) -> Result<()> {
    if frame.len() < V1_HEADER_LEN {
        bail!("frame shorter than a v1 header");
    }
    let (head, payload) = frame.split_at(V1_HEADER_LEN);
    let len = u32::from_be_bytes(head[44..48].try_into()?) as usize;
    if len != payload.len() || len != out.len() {
        bail!(
            "frame carries {} payload bytes; the reader wants {}",
            payload.len(),
            out.len()
        );
    }
    let mut crc_head = [0u8; V1_HEADER_LEN];
    crc_head.copy_from_slice(head);
    crc_head[V1_CRC].fill(0);
    let carried = u32::from_be_bytes(head[V1_CRC].try_into()?);
    if crc32c::crc32c_append(crc32c::crc32c(&crc_head), payload) != carried {
        bail!("v1 frame CRC32C mismatch");
    }
    let tag = v1_tag(key, head, payload);
    let diff = tag
        .iter()
        .zip(&head[V1_TAG])
        .fold(0u8, |d, (a, b)| d | (a ^ b));
    if diff != 0 {
        bail!("v1 frame tag does not verify");
    }
    out.copy_from_slice(payload);
    Ok(())
}

/// One case's state: buffers, keys and counters.
trait Op {
    /// Untimed work before each timed call.
    fn prepare(&mut self) -> Result<()> {
        Ok(())
    }
    /// The timed call: processes one buffer's payload.
    fn run(&mut self) -> Result<()>;
}

struct Memcpy {
    src: Vec<u8>,
    dst: Vec<u8>,
}

impl Op for Memcpy {
    fn run(&mut self) -> Result<()> {
        black_box(&mut self.dst[..]).copy_from_slice(black_box(&self.src[..]));
        black_box(&self.dst);
        Ok(())
    }
}

struct Crc {
    buf: Vec<u8>,
}

impl Op for Crc {
    fn run(&mut self) -> Result<()> {
        black_box(crc32c::crc32c(black_box(&self.buf)));
        Ok(())
    }
}

struct Blake3Keyed {
    key: [u8; 32],
    buf: Vec<u8>,
}

impl Op for Blake3Keyed {
    fn run(&mut self) -> Result<()> {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(black_box(&self.buf));
        black_box(h.finalize());
        Ok(())
    }
}

/// Seal in place (AES-256-GCM or ChaCha20-Poly1305); the buffer is sealed
/// again and again, each time under a new nonce.
struct Seal {
    key: CountedKey,
    header: [u8; V2_HEADER_LEN],
    buf: Vec<u8>,
}

impl Op for Seal {
    fn run(&mut self) -> Result<()> {
        let tag = self.key.seal(&mut self.header, black_box(&mut self.buf))?;
        let _ = black_box(tag);
        black_box(&self.buf);
        Ok(())
    }
}

/// Open in place; each call's buffer is sealed beforehand, untimed.
struct Open {
    key: CountedKey,
    header: [u8; V2_HEADER_LEN],
    buf: Vec<u8>,
    tag: Option<Tag>,
}

impl Op for Open {
    fn prepare(&mut self) -> Result<()> {
        self.tag = Some(self.key.seal(&mut self.header, &mut self.buf)?);
        Ok(())
    }

    fn run(&mut self) -> Result<()> {
        let tag = self
            .tag
            .take()
            .context("open called without a freshly sealed buffer")?;
        let plain = self.key.open(&self.header, tag, black_box(&mut self.buf))?;
        black_box(plain);
        Ok(())
    }
}

struct Gmac {
    key: CountedKey,
    buf: Vec<u8>,
}

impl Op for Gmac {
    fn run(&mut self) -> Result<()> {
        let _ = black_box(self.key.gmac(black_box(&self.buf))?);
        Ok(())
    }
}

struct V2Send {
    key: CountedKey,
    src: Vec<u8>,
    frame: Vec<u8>,
}

impl Op for V2Send {
    fn run(&mut self) -> Result<()> {
        v2_send(
            &mut self.key,
            black_box(&mut self.frame),
            black_box(&self.src),
        )?;
        black_box(&self.frame);
        Ok(())
    }
}

struct V2Recv {
    key: CountedKey,
    src: Vec<u8>,
    frame: Vec<u8>,
    out: Vec<u8>,
}

impl Op for V2Recv {
    fn prepare(&mut self) -> Result<()> {
        v2_send(&mut self.key, &mut self.frame, &self.src)
    }

    fn run(&mut self) -> Result<()> {
        v2_recv(
            &self.key,
            black_box(&mut self.frame),
            black_box(&mut self.out),
        )?;
        black_box(&self.out);
        Ok(())
    }
}

struct V1Send {
    key: FrameKey,
    seq: u64,
    src: Vec<u8>,
    frame: Vec<u8>,
}

impl Op for V1Send {
    fn run(&mut self) -> Result<()> {
        self.seq = self.seq.wrapping_add(1);
        v1_send(
            &self.key,
            self.seq,
            black_box(&mut self.frame),
            black_box(&self.src),
        )?;
        black_box(&self.frame);
        Ok(())
    }
}

struct V1Recv {
    key: FrameKey,
    seq: u64,
    src: Vec<u8>,
    frame: Vec<u8>,
    out: Vec<u8>,
}

impl Op for V1Recv {
    fn prepare(&mut self) -> Result<()> {
        self.seq = self.seq.wrapping_add(1);
        v1_send(&self.key, self.seq, &mut self.frame, &self.src)
    }

    fn run(&mut self) -> Result<()> {
        v1_recv(&self.key, black_box(&self.frame), black_box(&mut self.out))?;
        black_box(&self.out);
        Ok(())
    }
}

/// A buffer of `n` random bytes (so every page is touched and nothing is
/// trivially compressible).
fn random_buf(rng: &dyn SecureRandom, n: usize) -> Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    rng.fill(&mut v)
        .map_err(|_| anyhow!("the system random source failed"))?;
    Ok(v)
}

fn random_key(rng: &dyn SecureRandom) -> Result<[u8; 32]> {
    let mut k = [0u8; 32];
    rng.fill(&mut k)
        .map_err(|_| anyhow!("the system random source failed; cannot make a key"))?;
    Ok(k)
}

/// The state for `case` on `size`-byte buffers, with fresh keys.
fn make(case: Case, size: usize, rng: &dyn SecureRandom) -> Result<Box<dyn Op>> {
    let buf = || random_buf(rng, size);
    let gcm = || CountedKey::random(&aead::AES_256_GCM, rng);
    Ok(match case {
        Case::Memcpy => Box::new(Memcpy {
            src: buf()?,
            dst: buf()?,
        }),
        Case::Crc32c => Box::new(Crc { buf: buf()? }),
        Case::Blake3Keyed => Box::new(Blake3Keyed {
            key: random_key(rng)?,
            buf: buf()?,
        }),
        Case::Aes256GcmSeal => Box::new(Seal {
            key: gcm()?,
            header: [0; V2_HEADER_LEN],
            buf: buf()?,
        }),
        Case::Chacha20Poly1305Seal => Box::new(Seal {
            key: CountedKey::random(&aead::CHACHA20_POLY1305, rng)?,
            header: [0; V2_HEADER_LEN],
            buf: buf()?,
        }),
        Case::Aes256GcmOpen => Box::new(Open {
            key: gcm()?,
            header: [0; V2_HEADER_LEN],
            buf: buf()?,
            tag: None,
        }),
        Case::Gmac => Box::new(Gmac {
            key: gcm()?,
            buf: buf()?,
        }),
        Case::StpV2Send => Box::new(V2Send {
            key: gcm()?,
            src: buf()?,
            frame: v2_frame(size),
        }),
        Case::StpV2Recv => Box::new(V2Recv {
            key: gcm()?,
            src: buf()?,
            frame: v2_frame(size),
            out: vec![0; size],
        }),
        Case::StpV1Send => Box::new(V1Send {
            key: FrameKey::from_bytes(random_key(rng)?),
            seq: 0,
            src: buf()?,
            frame: vec![0; V1_HEADER_LEN + size],
        }),
        Case::StpV1Recv => Box::new(V1Recv {
            key: FrameKey::from_bytes(random_key(rng)?),
            seq: 0,
            src: buf()?,
            frame: vec![0; V1_HEADER_LEN + size],
            out: vec![0; size],
        }),
    })
}

/// This thread's CPU time, seconds.
fn thread_cpu() -> Result<f64> {
    let t = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .context("cannot read this thread's CPU clock (CLOCK_THREAD_CPUTIME_ID)")?;
    Ok(t.tv_sec() as f64 + t.tv_nsec() as f64 * 1e-9)
}

/// One case's timed calls in one round.
#[derive(Clone, Copy, Debug, Default)]
struct Timed {
    calls: u64,
    /// CPU seconds of this thread inside the calls.
    cpu: f64,
    /// Wall-clock seconds inside the calls.
    wall: f64,
}

/// Calls `op` until `budget` CPU seconds of timed calls have passed (at
/// least once; at most 10 × `budget` of wall-clock time in calls, should
/// the thread get little CPU).
fn time_op(op: &mut dyn Op, budget: f64) -> Result<Timed> {
    let mut t = Timed::default();
    while t.calls == 0 || (t.cpu < budget && t.wall < 10.0 * budget) {
        op.prepare()?;
        let w0 = Instant::now();
        let c0 = thread_cpu()?;
        op.run()?;
        let c1 = thread_cpu()?;
        t.wall += w0.elapsed().as_secs_f64();
        t.cpu += c1 - c0;
        t.calls += 1;
    }
    Ok(t)
}

/// The median of `v` (the mean of the two middle values for an even count).
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Runs the benchmark.
pub fn measure(args: &ProtectionArgs) -> Result<ProtectionReport> {
    let cases: Vec<Case> = if args.cases.is_empty() {
        Case::ALL.to_vec()
    } else {
        args.cases.clone()
    };
    let rng = SystemRandom::new();
    let mut ops = Vec::with_capacity(cases.len());
    for &c in &cases {
        let mut op =
            make(c, args.size, &rng).with_context(|| format!("setting up case {}", c.name()))?;
        // One untimed call: faults the pages in and checks the case works.
        op.prepare()?;
        op.run()
            .with_context(|| format!("case {} failed its first call", c.name()))?;
        ops.push(op);
    }
    // Per case, per round.
    let mut rounds: Vec<Vec<Timed>> = vec![Vec::new(); cases.len()];
    for round in 1..=args.rounds {
        if !args.quiet && !args.json {
            eprintln!(
                "round {round} of {}: {} cases, {} s each",
                args.rounds,
                cases.len(),
                args.seconds
            );
        }
        for (i, op) in ops.iter_mut().enumerate() {
            let r = time_op(op.as_mut(), args.seconds)
                .with_context(|| format!("case {} failed in round {round}", cases[i].name()))?;
            rounds[i].push(r);
        }
    }
    let size = args.size as u64;
    let results = cases
        .iter()
        .zip(&rounds)
        .map(|(c, rs)| {
            let rate = |bytes: u64, s: f64| bytes as f64 / s.max(1e-12) / 1e9;
            let rates: Vec<f64> = rs.iter().map(|t| rate(t.calls * size, t.cpu)).collect();
            let wall: Vec<f64> = rs.iter().map(|t| rate(t.calls * size, t.wall)).collect();
            let med = median(&rates);
            let calls: u64 = rs.iter().map(|t| t.calls).sum();
            let cpu: f64 = rs.iter().map(|t| t.cpu).sum();
            let wall_s: f64 = rs.iter().map(|t| t.wall).sum();
            CaseResult {
                name: c.name().into(),
                what: c.what().into(),
                median_gbps: med,
                median_mbps: med * 1000.0,
                min_gbps: rates.iter().copied().fold(f64::INFINITY, f64::min),
                max_gbps: rates.iter().copied().fold(0.0, f64::max),
                rounds_gbps: rates,
                median_wall_gbps: median(&wall),
                rounds_wall_gbps: wall,
                bytes: calls * size,
                ops: calls,
                seconds: cpu,
                wall_seconds: wall_s,
                cpu_share: if wall_s > 0.0 { cpu / wall_s } else { 0.0 },
                cpu_s_per_gb: if med > 0.0 { 1.0 / med } else { 0.0 },
            }
        })
        .collect();
    Ok(ProtectionReport {
        schema: PROTECTION_SCHEMA,
        mode: "protection".into(),
        cpu: CpuInfo::here(),
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
        .into(),
        threads: 1,
        size,
        aad_bytes: V2_HEADER_LEN as u64,
        seconds_per_case: args.seconds,
        rounds: args.rounds,
        cases: results,
    })
}

/// The text table.
pub fn table(r: &ProtectionReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Frame protection, one core: {} per call, {} s per case, {} round{} interleaved ({} build)",
        super::units::human_bytes(r.size),
        r.seconds_per_case,
        r.rounds,
        if r.rounds == 1 { "" } else { "s" },
        r.build
    );
    let _ = writeln!(
        s,
        "cpu: {} ({}; {})",
        r.cpu.model.as_deref().unwrap_or("unknown model"),
        r.cpu.arch,
        r.cpu.flags_text()
    );
    let _ = writeln!(
        s,
        "{:<22} {:>8} {:>9} {:>15} {:>9} {:>9} {:>6}  what",
        "case", "GB/s", "MB/s", "rounds min-max", "CPU-s/GB", "wall GB/s", "cpu"
    );
    for c in &r.cases {
        let _ = writeln!(
            s,
            "{:<22} {:>8.3} {:>9.0} {:>15} {:>9.3} {:>9.3} {:>6.2}  {}",
            c.name,
            c.median_gbps,
            c.median_mbps,
            format!("{:.3}-{:.3}", c.min_gbps, c.max_gbps),
            c.cpu_s_per_gb,
            c.median_wall_gbps,
            c.cpu_share,
            c.what
        );
    }
    let _ = writeln!(
        s,
        "(GB/s: the median round, 10^9 payload bytes per CPU second of one thread; wall GB/s: the same by the wall clock; cpu: the share of a core the thread got)"
    );
    s
}

/// Runs `stp bench protection`.
pub fn run(args: &ProtectionArgs) -> Result<()> {
    if cfg!(debug_assertions) && !args.quiet && !args.json {
        eprintln!("note: a debug build; build with --release for figures worth quoting");
    }
    let r = measure(args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", table(&r));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(size: usize, cases: &[Case]) -> ProtectionArgs {
        ProtectionArgs {
            size,
            seconds: 0.002,
            rounds: 2,
            cases: cases.to_vec(),
            json: true,
            quiet: true,
        }
    }

    #[test]
    fn sizes_and_seconds() {
        assert_eq!(parse_frame_size("1m"), Ok(1 << 20));
        assert_eq!(parse_frame_size("4k"), Ok(4096));
        assert_eq!(parse_frame_size("1"), Ok(1));
        for bad in ["0", "2m", "1025k", "x", ""] {
            assert!(parse_frame_size(bad).is_err(), "{bad}");
        }
        assert!(parse_frame_size("2m").unwrap_err().contains("at most 1m"));
        assert_eq!(parse_seconds("1"), Ok(1.0));
        assert_eq!(parse_seconds("0.25"), Ok(0.25));
        for bad in ["0", "-1", "nan", "inf", "1s", "", "3601"] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nonces_count_up_and_never_wrap() {
        let rng = SystemRandom::new();
        let mut k = CountedKey::random(&aead::AES_256_GCM, &rng).unwrap();
        let a = k.next_nonce().unwrap();
        let b = k.next_nonce().unwrap();
        assert_ne!(a, b);
        assert_eq!(b[NONCE_LEN - 1], 1);
        k.next = u64::MAX - 1;
        assert!(k.next_nonce().is_ok());
        let e = k.next_nonce().unwrap_err();
        assert!(e.to_string().contains("new key"), "{e}");
        // Still spent: no reuse after the error either.
        assert!(k.next_nonce().is_err());
    }

    #[test]
    fn seal_then_open_round_trips_and_tampering_fails() {
        let rng = SystemRandom::new();
        let mut k = CountedKey::random(&aead::AES_256_GCM, &rng).unwrap();
        let plain = random_buf(&rng, 4096).unwrap();
        let mut buf = plain.clone();
        let mut header = [7u8; V2_HEADER_LEN];
        let tag = k.seal(&mut header, &mut buf).unwrap();
        assert_ne!(buf, plain, "seal left the payload in clear");
        let mut ok = buf.clone();
        assert_eq!(k.open(&header, tag, &mut ok).unwrap(), &plain[..]);
        // A flipped payload byte, header byte or tag byte: open fails.
        let mut bad = buf.clone();
        bad[100] ^= 1;
        assert!(k.open(&header, tag, &mut bad).is_err());
        let mut h2 = header;
        h2[40] ^= 1;
        assert!(k.open(&h2, tag, &mut buf.clone()).is_err());
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(tag.as_ref());
        t[0] ^= 1;
        let e = k.open(&header, Tag::from(t), &mut buf.clone()).unwrap_err();
        assert!(e.to_string().contains("authentication failed"), "{e}");
        // A second seal of the same bytes uses a new nonce.
        let mut again = plain.clone();
        let mut h3 = [7u8; V2_HEADER_LEN];
        let _tag = k.seal(&mut h3, &mut again).unwrap();
        assert_ne!(h3[V2_NONCE], header[V2_NONCE]);
        assert_ne!(again, buf);
    }

    #[test]
    fn v2_frames_round_trip_and_reject_tampering() {
        let rng = SystemRandom::new();
        let mut k = CountedKey::random(&aead::AES_256_GCM, &rng).unwrap();
        let src = random_buf(&rng, 1000).unwrap();
        let mut frame = v2_frame(src.len());
        v2_send(&mut k, &mut frame, &src).unwrap();
        assert_ne!(&frame[V2_HEADER_LEN..V2_HEADER_LEN + 1000], &src[..]);
        let sealed = frame.clone();
        let mut out = vec![0u8; 1000];
        v2_recv(&k, &mut frame, &mut out).unwrap();
        assert_eq!(out, src);
        for (at, why) in [
            (30, "CRC32C"),
            (V2_HEADER_LEN + 5, "authentication"),
            (sealed.len() - 1, "authentication"),
        ] {
            let mut f = sealed.clone();
            f[at] ^= 0x80;
            let e = v2_recv(&k, &mut f, &mut out).unwrap_err();
            assert!(e.to_string().contains(why), "byte {at}: {e}");
        }
        // A header whose CRC is made to match still fails authentication.
        let mut f = sealed.clone();
        f[30] ^= 0x80;
        let mut h = [0u8; V2_HEADER_LEN];
        h.copy_from_slice(&f[..V2_HEADER_LEN]);
        h[V2_CRC].fill(0);
        let crc = crc32c::crc32c(&h);
        f[V2_CRC].copy_from_slice(&crc.to_be_bytes());
        let e = v2_recv(&k, &mut f, &mut out).unwrap_err();
        assert!(e.to_string().contains("authentication"), "{e}");
    }

    #[test]
    fn v1_frames_are_stp_core_frames() {
        let rng = SystemRandom::new();
        let key = FrameKey::from_bytes(random_key(&rng).unwrap());
        let src = random_buf(&rng, 3000).unwrap();
        let mut frame = vec![0u8; V1_HEADER_LEN + src.len()];
        v1_send(&key, 9, &mut frame, &src).unwrap();
        assert_eq!(&frame[24..32], &9u64.to_be_bytes());
        let mut out = vec![0u8; src.len()];
        v1_recv(&key, &frame, &mut out).unwrap();
        assert_eq!(out, src);
        frame[V1_HEADER_LEN + 7] ^= 1;
        assert!(v1_recv(&key, &frame, &mut out).is_err());
    }

    #[test]
    fn every_case_processes_bytes() {
        let r = measure(&args(4096, &[])).unwrap();
        assert_eq!(r.cases.len(), Case::ALL.len());
        for (c, want) in r.cases.iter().zip(Case::ALL) {
            assert_eq!(c.name, want.name());
            assert!(c.ops >= 2, "{}: {} calls", c.name, c.ops);
            assert_eq!(c.bytes, c.ops * 4096, "{}", c.name);
            assert_eq!(c.rounds_gbps.len(), 2);
            assert!(c.median_gbps > 0.0 && c.median_gbps.is_finite(), "{c:?}");
            assert!(c.min_gbps <= c.median_gbps && c.median_gbps <= c.max_gbps);
            assert!((c.median_mbps - c.median_gbps * 1000.0).abs() < 1e-6);
            assert!(c.seconds > 0.0 && c.wall_seconds > 0.0, "{c:?}");
            assert!(c.median_wall_gbps > 0.0 && c.cpu_share > 0.0, "{c:?}");
        }
    }

    #[test]
    fn each_op_does_its_work() {
        let rng = SystemRandom::new();
        // memcpy copies.
        let mut m = Memcpy {
            src: random_buf(&rng, 512).unwrap(),
            dst: vec![0; 512],
        };
        m.run().unwrap();
        assert_eq!(m.src, m.dst);
        // Open opens what prepare sealed, and only that.
        let plain = random_buf(&rng, 512).unwrap();
        let mut o = Open {
            key: CountedKey::random(&aead::AES_256_GCM, &rng).unwrap(),
            header: [0; V2_HEADER_LEN],
            buf: plain.clone(),
            tag: None,
        };
        assert!(o.run().is_err(), "open without a sealed buffer");
        o.prepare().unwrap();
        assert_ne!(o.buf, plain);
        o.run().unwrap();
        assert_eq!(o.buf, plain);
        o.prepare().unwrap();
        o.buf[0] ^= 1;
        assert!(o.run().is_err(), "tampered buffer opened");
        // The v2 receiver hands back the sender's bytes.
        let mut r = V2Recv {
            key: CountedKey::random(&aead::AES_256_GCM, &rng).unwrap(),
            src: random_buf(&rng, 512).unwrap(),
            frame: v2_frame(512),
            out: vec![0; 512],
        };
        r.prepare().unwrap();
        r.run().unwrap();
        assert_eq!(r.out, r.src);
    }

    #[test]
    fn json_shape() {
        let r = measure(&args(1024, &[Case::Memcpy, Case::Aes256GcmOpen])).unwrap();
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["schema"], PROTECTION_SCHEMA);
        assert_eq!(v["mode"], "protection");
        assert_eq!(v["size"], 1024);
        assert_eq!(v["rounds"], 2);
        assert_eq!(v["threads"], 1);
        assert_eq!(v["aad_bytes"], 80);
        for key in ["model", "arch", "aes_ni", "vaes", "sha_ni", "avx512f"] {
            assert!(v["cpu"].get(key).is_some(), "cpu.{key}");
        }
        let cases = v["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 2);
        assert_eq!(cases[1]["name"], "aes256gcm-open");
        for key in [
            "what",
            "median_gbps",
            "median_mbps",
            "min_gbps",
            "max_gbps",
            "rounds_gbps",
            "median_wall_gbps",
            "rounds_wall_gbps",
            "bytes",
            "ops",
            "seconds",
            "wall_seconds",
            "cpu_share",
            "cpu_s_per_gb",
        ] {
            assert!(cases[0].get(key).is_some(), "case lacks {key}");
        }
        assert_eq!(cases[0]["rounds_gbps"].as_array().unwrap().len(), 2);
        let back: ProtectionReport = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
        assert!(back.case("memcpy").is_some() && back.case("gmac").is_none());
        assert!(table(&r).contains("aes256gcm-open"));
    }

    #[test]
    fn cpuinfo() {
        let c = CpuInfo::parse(
            "processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu sse4_2 aes avx2 sha_ni vaes\n\
             processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n",
        );
        assert_eq!(c.model.as_deref(), Some("AMD EPYC 9B14"));
        assert!(c.aes_ni && c.vaes && c.sha_ni && c.avx2);
        assert!(!c.vpclmulqdq && !c.avx512f && !c.pclmulqdq);
        assert_eq!(CpuInfo::parse("").model, None);
    }

    #[test]
    fn the_protections_stp_runs_with_are_named() {
        // `stp bench stp --protection` records these names.
        assert_eq!(Protection::default().name(), V2_PROTECTION);
        assert_eq!(Protection::Authenticate.name(), V2_AUTH_ONLY);
    }

    #[test]
    fn median_of_rounds() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}
