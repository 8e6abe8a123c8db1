//! Which engine drives a device: bsg io_uring passthrough, the io_uring
//! sg v3 engine, or synchronous `SG_IO`, chosen once per open with a
//! probe, and why.
//!
//! [`EngineChoice::Auto`] (the default) tries, in order:
//!
//! 1. **bsg** ([`UringBsg`]): the device's `/dev/bsg/H:C:T:L` node exists,
//!    io_uring knows `URING_CMD`, and a TEST UNIT READY through it comes
//!    back with a SCSI status ([`bsg::probe`]) — Linux 7.1 and later;
//! 2. **sg v3** ([`UringSg`]): the path is a `/dev/sgN` and io_uring works;
//! 3. **synchronous `SG_IO`** ([`SgDevice`](crate::sg::SgDevice)), which any sg or SCSI block
//!    node takes.
//!
//! Each step that fails adds its reason to the [`BestPath::reason`] of the
//! engine that runs. An override forces one engine (and fails, with the
//! reason, when it cannot run): [`set_engine_override`] (the `stp --engine`
//! option) or the [`ENGINE_ENV`] environment variable.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;

use crate::bsg::{self, UringBsg};
use crate::sg::SgError;
use crate::uring::{BestPath, Engine, UringError, UringSg};

/// The environment variable that forces an engine: `auto`, `bsg`, `sg`
/// or `sync`.
pub const ENGINE_ENV: &str = "STP_ENGINE";

/// Which engine to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum EngineChoice {
    /// The best that works (bsg, then sg v3, then `SG_IO`).
    #[default]
    Auto,
    /// bsg io_uring passthrough only.
    Bsg,
    /// The io_uring sg v3 engine only.
    Sg,
    /// Synchronous `SG_IO` only.
    Sync,
}

impl EngineChoice {
    /// The name [`FromStr`] takes.
    pub fn name(self) -> &'static str {
        match self {
            EngineChoice::Auto => "auto",
            EngineChoice::Bsg => "bsg",
            EngineChoice::Sg => "sg",
            EngineChoice::Sync => "sync",
        }
    }
}

impl fmt::Display for EngineChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for EngineChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<EngineChoice, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(EngineChoice::Auto),
            "bsg" => Ok(EngineChoice::Bsg),
            "sg" | "sgv3" | "sg-v3" => Ok(EngineChoice::Sg),
            "sync" | "sg_io" | "sg-io" => Ok(EngineChoice::Sync),
            other => Err(format!(
                "unknown engine {other:?}: use auto, bsg, sg or sync"
            )),
        }
    }
}

static OVERRIDE: Mutex<Option<EngineChoice>> = Mutex::new(None);

/// Forces `choice` for every later open in this process (`None`: back to
/// [`ENGINE_ENV`] or auto). Engines already open stay as they are.
pub fn set_engine_override(choice: Option<EngineChoice>) {
    *OVERRIDE.lock().unwrap_or_else(|e| e.into_inner()) = choice;
}

/// The engine choice in force: the override, else [`ENGINE_ENV`], else
/// auto. A malformed variable is an error that names it.
pub fn engine_choice() -> Result<EngineChoice, String> {
    if let Some(c) = *OVERRIDE.lock().unwrap_or_else(|e| e.into_inner()) {
        return Ok(c);
    }
    match std::env::var(ENGINE_ENV) {
        Ok(v) => v.parse().map_err(|e| format!("{ENGINE_ENV}: {e}")),
        Err(_) => Ok(EngineChoice::Auto),
    }
}

/// An engine opened for a path, before it is boxed or shared.
pub(crate) enum Opened {
    Bsg(UringBsg, String),
    Sg(UringSg, String),
    Sync(BestPath),
}

fn unavailable(path: &Path, engine: &'static str, why: String) -> SgError {
    SgError::EngineUnavailable {
        path: path.to_owned(),
        engine,
        why,
    }
}

/// Tries bsg on `path`: its node, the probe, the engine.
fn try_bsg(path: &Path, depth: usize) -> Result<UringBsg, String> {
    let node = bsg::bsg_node_for(path)?;
    bsg::probe(&node).map_err(|e| e.to_string())?;
    UringBsg::open(&node, depth).map_err(|e| e.to_string())
}

/// Opens `path` with the engine [`engine_choice`] says, at `depth`.
pub(crate) fn open_engine(path: &Path, depth: usize) -> Result<Opened, SgError> {
    let choice = engine_choice().map_err(|why| unavailable(path, "any", why))?;
    let mut not_bsg = None;
    if matches!(choice, EngineChoice::Auto | EngineChoice::Bsg) {
        match try_bsg(path, depth) {
            Ok(t) => {
                let forced = if choice == EngineChoice::Bsg {
                    format!(" (forced by {ENGINE_ENV}/--engine)")
                } else {
                    String::new()
                };
                let reason = format!(
                    "io_uring bsg passthrough engine{forced}: {}, kernel {}",
                    t.describe_short(),
                    bsg::kernel_release()
                );
                return Ok(Opened::Bsg(t, reason));
            }
            Err(why) if choice == EngineChoice::Bsg => {
                return Err(unavailable(path, "bsg", why));
            }
            Err(why) => not_bsg = Some(why),
        }
    }
    let suffix = not_bsg
        .as_ref()
        .map(|w| format!("; bsg passthrough not used: {w}"))
        .unwrap_or_default();
    let mut why_sync = None;
    if matches!(choice, EngineChoice::Auto | EngineChoice::Sg) {
        match UringSg::open(path, depth) {
            Ok(t) => {
                let reason = format!(
                    "io_uring sg v3 engine: {} fd(s), {}, {}{suffix}",
                    t.fd_count(),
                    t.ring_mode().name(),
                    t.direct_io()
                );
                return Ok(Opened::Sg(t, reason));
            }
            Err(UringError::Sg(e)) => return Err(e),
            Err(e) if choice == EngineChoice::Sg => {
                return Err(unavailable(path, "sg", e.to_string()))
            }
            Err(e) => why_sync = Some(e.to_string()),
        }
    }
    let why = match why_sync {
        Some(w) => format!("{w}{suffix}"),
        None => format!("forced by {ENGINE_ENV}/--engine"),
    };
    BestPath::sync_fallback(path, &why).map(Opened::Sync)
}

impl Opened {
    /// Boxes the engine for one thread.
    pub(crate) fn into_best(self) -> BestPath {
        match self {
            Opened::Bsg(t, reason) => BestPath {
                transport: Box::new(t),
                engine: Engine::UringBsg,
                reason,
            },
            Opened::Sg(t, reason) => BestPath {
                transport: Box::new(t),
                engine: Engine::UringSg,
                reason,
            },
            Opened::Sync(b) => b,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_print() {
        for c in [
            EngineChoice::Auto,
            EngineChoice::Bsg,
            EngineChoice::Sg,
            EngineChoice::Sync,
        ] {
            assert_eq!(c.name().parse::<EngineChoice>(), Ok(c));
            assert_eq!(c.to_string(), c.name());
        }
        assert_eq!(" BSG ".parse::<EngineChoice>(), Ok(EngineChoice::Bsg));
        let e = "uring".parse::<EngineChoice>().unwrap_err();
        assert!(e.contains("auto, bsg, sg or sync"), "{e}");
    }

    #[test]
    fn forced_engines_fail_with_the_reason() {
        // /dev/null is no SCSI device: bsg says why, sg says it is not sg.
        let e = try_bsg(Path::new("/dev/null"), 4).unwrap_err();
        assert!(e.contains("not a SCSI device"), "{e}");
        let err = unavailable(Path::new("/dev/sg9"), "bsg", e);
        assert!(err.to_string().contains("the bsg engine"), "{err}");
    }
}
