//! The per-connection frame key (docs/PROTOCOL.md §7).
//!
//! Another initiator on the SAN can write to the same LUNs, so every frame
//! carries a tag computed with a key that only the two endpoints know. The
//! key is agreed over the TCP control connection before the STP connection
//! opens:
//!
//! 1. each side makes a [`Handshake`] (an X25519 key pair and a 16-byte
//!    nonce) and sends its [`Offer`] (public key and nonce, 48 bytes);
//! 2. each side calls [`Handshake::finish`] with the peer's offer, its own
//!    [`Role`] and the optional pre-shared key, and gets the same
//!    [`FrameKey`]:
//!    `HKDF-SHA256(salt = nonce_client ‖ nonce_server,
//!    ikm = X25519 shared secret ‖ PSK, info = "stp v2 frame key")`.
//!
//! [`crate::frame`] seals and opens frames with the resulting key.
//!
//! No-panic contract: nothing here panics on any input (offer bytes, public
//! keys, PSKs of any length). A peer public key of low order, which would
//! make the shared secret all zero and the key predictable, is an error.

use std::fmt;

use hkdf::HkdfExtract;
use rand::{CryptoRng, RngCore};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

/// The HKDF `info` string for the frame key.
const INFO: &[u8] = b"stp v2 frame key";

/// Bytes in an X25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Bytes in a handshake nonce.
pub const NONCE_LEN: usize = 16;
/// Bytes in an encoded [`Offer`]: public key then nonce.
pub const OFFER_LEN: usize = PUBLIC_KEY_LEN + NONCE_LEN;

/// The 32-byte key that authenticates one connection's frames.
///
/// Its `Debug` output never shows the key.
#[derive(Clone)]
pub struct FrameKey([u8; 32]);

impl FrameKey {
    /// A key from raw bytes (tests, or a key agreed by other means).
    pub fn from_bytes(bytes: [u8; 32]) -> FrameKey {
        FrameKey(bytes)
    }

    /// Derives the frame key (docs/PROTOCOL.md §7 step 2):
    /// `HKDF-SHA256(salt = nonce_client ‖ nonce_server,
    /// ikm = shared_secret ‖ psk, info = "stp v2 frame key")`.
    /// No PSK and an empty PSK give the same key.
    pub fn derive(
        shared_secret: &[u8; 32],
        psk: Option<&[u8]>,
        nonce_client: &[u8; NONCE_LEN],
        nonce_server: &[u8; NONCE_LEN],
    ) -> FrameKey {
        let mut salt = [0u8; 2 * NONCE_LEN];
        salt[..NONCE_LEN].copy_from_slice(nonce_client);
        salt[NONCE_LEN..].copy_from_slice(nonce_server);
        // Feed the IKM in pieces rather than concatenating secrets into a
        // heap buffer.
        let mut extract = HkdfExtract::<Sha256>::new(Some(&salt));
        extract.input_ikm(shared_secret);
        extract.input_ikm(psk.unwrap_or_default());
        let (_, hkdf) = extract.finalize();
        let mut okm = [0u8; 32];
        hkdf.expand(INFO, &mut okm)
            .expect("HKDF-SHA256 expands to 32 bytes (limit is 255 * 32)");
        FrameKey(okm)
    }

    /// `HKDF-Expand(PRK = this key, info)`, 32 bytes: a connection's
    /// own key ([`crate::frame::Cipher::new`]). The session key is already
    /// uniformly random, so it serves as the pseudorandom key directly.
    pub(crate) fn expand(&self, info: &[u8]) -> [u8; 32] {
        let hkdf = hkdf::Hkdf::<Sha256>::from_prk(&self.0)
            .expect("a 32-byte PRK is long enough for HKDF-SHA256");
        let mut okm = [0u8; 32];
        hkdf.expand(info, &mut okm)
            .expect("HKDF-SHA256 expands to 32 bytes (limit is 255 * 32)");
        okm
    }
}

impl fmt::Debug for FrameKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FrameKey(<redacted>)")
    }
}

/// Why a key agreement failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// An encoded offer had the wrong length.
    #[error("handshake offer must be {OFFER_LEN} bytes (public key and nonce), got {got}")]
    OfferLength {
        /// Bytes received.
        got: usize,
    },
    /// The peer's public key is a low-order point: the shared secret would be
    /// all zero, a value anyone can compute.
    #[error("peer's X25519 public key is a low-order point (shared secret would be zero)")]
    LowOrderPoint,
    /// The peer's offer is our own offer sent back (a reflection, or both
    /// ends sharing one handshake).
    #[error("peer's handshake offer is identical to ours (reflected offer)")]
    ReflectedOffer,
}

/// Which end of the control connection this side is; fixes the nonce order
/// in the key derivation (the client's nonce comes first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The side that opens the STP connection (sends the SYN).
    Client,
    /// The side that accepts it.
    Server,
}

/// One side's public half of the exchange: what goes over the control
/// connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Offer {
    /// X25519 public key.
    pub public_key: [u8; PUBLIC_KEY_LEN],
    /// Per-session nonce.
    pub nonce: [u8; NONCE_LEN],
}

impl Offer {
    /// The 48-byte encoding: public key, then nonce.
    pub fn to_bytes(&self) -> [u8; OFFER_LEN] {
        let mut out = [0u8; OFFER_LEN];
        out[..PUBLIC_KEY_LEN].copy_from_slice(&self.public_key);
        out[PUBLIC_KEY_LEN..].copy_from_slice(&self.nonce);
        out
    }

    /// Decodes [`Offer::to_bytes`]. `bytes` must be exactly
    /// [`OFFER_LEN`] bytes long.
    pub fn from_bytes(bytes: &[u8]) -> Result<Offer, AuthError> {
        let Ok(all) = <&[u8; OFFER_LEN]>::try_from(bytes) else {
            return Err(AuthError::OfferLength { got: bytes.len() });
        };
        let mut offer = Offer {
            public_key: [0; PUBLIC_KEY_LEN],
            nonce: [0; NONCE_LEN],
        };
        offer.public_key.copy_from_slice(&all[..PUBLIC_KEY_LEN]);
        offer.nonce.copy_from_slice(&all[PUBLIC_KEY_LEN..]);
        Ok(offer)
    }
}

/// One side of the key agreement: an X25519 secret and a nonce, fresh per
/// session. Consumed by [`Handshake::finish`].
///
/// Its `Debug` output shows only the public offer.
pub struct Handshake {
    secret: StaticSecret,
    offer: Offer,
}

impl Handshake {
    /// A fresh key pair and nonce from `rng` (use `rand::rngs::OsRng`
    /// outside tests).
    pub fn new(rng: &mut (impl RngCore + CryptoRng)) -> Handshake {
        let secret = StaticSecret::random_from_rng(&mut *rng);
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        let public_key = PublicKey::from(&secret).to_bytes();
        Handshake {
            secret,
            offer: Offer { public_key, nonce },
        }
    }

    /// What to send to the peer.
    pub fn public(&self) -> Offer {
        self.offer
    }

    /// Combines our secret with the peer's offer into the frame key.
    /// Both sides must pass the same `psk` and opposite roles.
    ///
    /// Fails if the peer's public key is of low order (the shared secret
    /// would be zero) or the peer's offer is our own.
    pub fn finish(
        self,
        peer: &Offer,
        role: Role,
        psk: Option<&[u8]>,
    ) -> Result<FrameKey, AuthError> {
        if *peer == self.offer {
            return Err(AuthError::ReflectedOffer);
        }
        let shared = self
            .secret
            .diffie_hellman(&PublicKey::from(peer.public_key));
        if !shared.was_contributory() {
            return Err(AuthError::LowOrderPoint);
        }
        let (client, server) = match role {
            Role::Client => (&self.offer.nonce, &peer.nonce),
            Role::Server => (&peer.nonce, &self.offer.nonce),
        };
        Ok(FrameKey::derive(shared.as_bytes(), psk, client, server))
    }
}

impl fmt::Debug for Handshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handshake")
            .field("offer", &self.offer)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hkdf::Hkdf;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn pair(seed: u64) -> (Handshake, Handshake) {
        let mut rng = StdRng::seed_from_u64(seed);
        (Handshake::new(&mut rng), Handshake::new(&mut rng))
    }

    #[test]
    fn both_sides_derive_the_same_key() {
        let (c, s) = pair(1);
        let (co, so) = (c.public(), s.public());
        assert_ne!(co, so);
        let kc = c.finish(&so, Role::Client, Some(b"psk")).unwrap();
        let ks = s.finish(&co, Role::Server, Some(b"psk")).unwrap();
        assert_eq!(kc.0, ks.0);
        assert_ne!(kc.0, [0; 32]);
    }

    #[test]
    fn different_psk_gives_different_key() {
        let (c, s) = pair(2);
        let (co, so) = (c.public(), s.public());
        let kc = c.finish(&so, Role::Client, Some(b"psk one")).unwrap();
        let ks = s.finish(&co, Role::Server, Some(b"psk two")).unwrap();
        assert_ne!(kc.0, ks.0);
        // Absent and empty PSK are the same input keying material.
        let (c, s) = pair(3);
        let (co, so) = (c.public(), s.public());
        let kc = c.finish(&so, Role::Client, None).unwrap();
        let ks = s.finish(&co, Role::Server, Some(b"")).unwrap();
        assert_eq!(kc.0, ks.0);
    }

    #[test]
    fn wrong_role_order_gives_different_key() {
        let (c, s) = pair(4);
        let (co, so) = (c.public(), s.public());
        let kc = c.finish(&so, Role::Client, None).unwrap();
        let ks = s.finish(&co, Role::Client, None).unwrap();
        assert_ne!(kc.0, ks.0);
    }

    #[test]
    fn low_order_public_keys_rejected() {
        // 0 and 1 are points of small order: a clamped scalar maps them to 0.
        let mut one = [0u8; 32];
        one[0] = 1;
        for bad in [[0u8; 32], one] {
            let (c, _) = pair(5);
            let peer = Offer {
                public_key: bad,
                nonce: [9; 16],
            };
            assert_eq!(
                c.finish(&peer, Role::Client, None).unwrap_err(),
                AuthError::LowOrderPoint
            );
        }
    }

    #[test]
    fn reflected_offer_rejected() {
        let (c, _) = pair(6);
        let own = c.public();
        assert_eq!(
            c.finish(&own, Role::Server, None).unwrap_err(),
            AuthError::ReflectedOffer
        );
    }

    #[test]
    fn offer_round_trip_and_length_errors() {
        let (c, _) = pair(7);
        let o = c.public();
        let b = o.to_bytes();
        assert_eq!(&b[..32], &o.public_key);
        assert_eq!(&b[32..], &o.nonce);
        assert_eq!(Offer::from_bytes(&b), Ok(o));
        assert_eq!(
            Offer::from_bytes(&b[..47]),
            Err(AuthError::OfferLength { got: 47 })
        );
        assert_eq!(
            Offer::from_bytes(&[]),
            Err(AuthError::OfferLength { got: 0 })
        );
        let mut long = b.to_vec();
        long.push(0);
        assert_eq!(
            Offer::from_bytes(&long),
            Err(AuthError::OfferLength { got: 49 })
        );
    }

    #[test]
    fn derive_matches_the_spec_formula() {
        let shared = [0x11; 32];
        let (nc, ns) = ([0x22; 16], [0x33; 16]);
        let psk = b"pre-shared";
        let mut salt = nc.to_vec();
        salt.extend_from_slice(&ns);
        let mut ikm = shared.to_vec();
        ikm.extend_from_slice(psk);
        let mut want = [0u8; 32];
        Hkdf::<Sha256>::new(Some(&salt), &ikm)
            .expand(b"stp v2 frame key", &mut want)
            .unwrap();
        assert_eq!(FrameKey::derive(&shared, Some(psk), &nc, &ns).0, want);
        assert_ne!(FrameKey::derive(&shared, Some(psk), &ns, &nc).0, want);
    }

    #[test]
    fn debug_does_not_show_secrets() {
        let key = FrameKey::from_bytes([0xAB; 32]);
        let shown = format!("{key:?} {key:#?}");
        assert!(!shown.contains("171") && !shown.to_lowercase().contains("ab, "));
        assert!(!shown.to_lowercase().contains("abab"));
        let (c, _) = pair(8);
        let shown = format!("{c:?}");
        assert!(shown.contains("offer") && !shown.contains("secret"));
    }
}
