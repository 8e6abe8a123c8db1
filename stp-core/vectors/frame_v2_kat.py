# Known-answer vectors for stp-core/src/frame.rs (docs/PROTOCOL.md §7), computed
# independently of the Rust code: pip install cryptography blake3; python3 frame_v2_kat.py
import hmac, hashlib, struct, blake3
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF
assert crc32c(b"123456789") == 0xE3069283
K = bytes(range(32)); conn_id = 0x0102030405060708
def okm(mode):
    info = b"stp v2 frames" + bytes([mode]) + conn_id.to_bytes(8,'big')
    return hmac.new(K, info + b"\x01", hashlib.sha256).digest()
def aad(flags):
    return struct.pack(">IBBHIIQQQIIQI", 0x53545046, 2, 4, flags, 32768, 5101, conn_id, 9, 4, 64, 10, 42, 0)
p = b"hello, stp"
a = aad(1 | 4); assert len(a) == 60
nonce = bytes([0,0,0,0]) + (42).to_bytes(8,'big')
ct = AESGCM(okm(1)).encrypt(nonce, p, a)
hdr = a + crc32c(a).to_bytes(4,'big') + ct[10:]
print("ENC_HEADER", hdr.hex()); print("ENC_PAYLOAD", ct[:10].hex())
a = aad(1)
tag = blake3.blake3(b"\x01" + a + p, key=okm(2)).digest(length=16)
hdr = a + crc32c(a).to_bytes(4,'big') + tag
print("AUTH_HEADER", hdr.hex())
