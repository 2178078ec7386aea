//! S3's additional checksums (CRC64NVME, CRC32C, CRC32, SHA-1, SHA-256): what an object
//! carries beside its ETag, and what a replica is written and verified with.
//!
//! S3 stores one such checksum per object, of one of two kinds:
//! - full-object: the checksum of the whole content, whatever the upload (every
//!   single-request upload; multipart uploads of the CRC algorithms asked for so);
//! - composite (multipart only): the checksum of the parts' checksums, shown as
//!   `<base64>-<parts>`. It depends on the part layout, like a multipart ETag.
//!
//! Two checksums say something about two objects' contents only when they are of the same
//! algorithm and kind (and, for composite ones, the same number of parts).

use std::fmt;

use sha1::Sha1;
use sha2::{Digest, Sha256};

/// One of S3's additional checksum algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChecksumAlgorithm {
    Crc64Nvme,
    Crc32c,
    Crc32,
    Sha1,
    Sha256,
}

impl ChecksumAlgorithm {
    /// The algorithm's name as S3 writes it (`x-amz-checksum-algorithm`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Crc64Nvme => "CRC64NVME",
            Self::Crc32c => "CRC32C",
            Self::Crc32 => "CRC32",
            Self::Sha1 => "SHA1",
            Self::Sha256 => "SHA256",
        }
    }

    /// Whether S3 keeps a full-object checksum of this algorithm for a multipart upload
    /// (the CRCs combine; the SHAs do not).
    pub fn combines(self) -> bool {
        matches!(self, Self::Crc64Nvme | Self::Crc32c | Self::Crc32)
    }
}

impl fmt::Display for ChecksumAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An object's stored checksum, as HEAD (with checksum mode) or GetObjectAttributes tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksum {
    pub algorithm: ChecksumAlgorithm,
    /// Base64 of the checksum's bytes, without a composite's `-<parts>` suffix.
    pub value: String,
    /// `Some(parts)` for a composite checksum (`None` when S3 said COMPOSITE but not the
    /// count is `Some(0)`); `None` for a full-object one.
    pub parts: Option<u32>,
}

impl Checksum {
    /// A checksum from S3's headers: `value` as sent (a composite one may end in
    /// `-<parts>`), `composite` when `x-amz-checksum-type` said COMPOSITE.
    pub fn from_header(algorithm: ChecksumAlgorithm, value: &str, composite: bool) -> Self {
        let (value, parts) = match value.rsplit_once('-') {
            Some((v, n)) if n.bytes().all(|b| b.is_ascii_digit()) && !n.is_empty() => {
                (v, n.parse().ok().or(Some(0)))
            }
            _ => (value, composite.then_some(0)),
        };
        Self {
            algorithm,
            value: value.to_string(),
            parts,
        }
    }

    /// The full-object checksum of `data`.
    pub fn compute(algorithm: ChecksumAlgorithm, data: &[u8]) -> Self {
        let bytes: Vec<u8> = match algorithm {
            ChecksumAlgorithm::Crc64Nvme => crc(crc_fast::CrcAlgorithm::Crc64Nvme, data, 8),
            ChecksumAlgorithm::Crc32c => crc(crc_fast::CrcAlgorithm::Crc32Iscsi, data, 4),
            ChecksumAlgorithm::Crc32 => crc(crc_fast::CrcAlgorithm::Crc32IsoHdlc, data, 4),
            ChecksumAlgorithm::Sha1 => Sha1::digest(data).to_vec(),
            ChecksumAlgorithm::Sha256 => Sha256::digest(data).to_vec(),
        };
        Self {
            algorithm,
            value: aws_smithy_types::base64::encode(bytes),
            parts: None,
        }
    }

    /// True for a checksum of the whole content (not of the parts' checksums).
    pub fn is_full_object(&self) -> bool {
        self.parts.is_none()
    }

    /// Whether this and `other` prove two contents equal (`Some(true)`) or different
    /// (`Some(false)`); `None` when they cannot be compared (another algorithm or kind, or
    /// composite checksums of different part layouts).
    pub fn agrees_with(&self, other: &Checksum) -> Option<bool> {
        if self.algorithm != other.algorithm {
            return None;
        }
        match (self.parts, other.parts) {
            (None, None) => Some(self.value == other.value),
            // A part count S3 did not tell (0) compares with any: moto omits the suffix.
            (Some(a), Some(b)) if a == b || a == 0 || b == 0 => Some(self.value == other.value),
            _ => None,
        }
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.parts {
            Some(n) if n > 0 => write!(f, "{} {}-{n}", self.algorithm, self.value),
            Some(_) => write!(f, "{} {} (composite)", self.algorithm, self.value),
            None => write!(f, "{} {}", self.algorithm, self.value),
        }
    }
}

/// A CRC of `data`, big-endian in `width` bytes, as S3 encodes it.
fn crc(algorithm: crc_fast::CrcAlgorithm, data: &[u8], width: usize) -> Vec<u8> {
    let value = crc_fast::checksum(algorithm, data);
    value.to_be_bytes()[8 - width..].to_vec()
}

/// What a write sends so that the server verifies the bytes on arrival.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SentChecksum {
    /// Nothing beyond what the protocol does anyway.
    #[default]
    None,
    /// This value, known beforehand (the source's own full-object checksum): the target
    /// refuses bytes that do not match it, and stores it.
    Known(Checksum),
    /// Computed over the bytes before they are sent.
    Compute(ChecksumAlgorithm),
}

impl SentChecksum {
    /// For a single-request write of a copy of an object whose stored checksum is
    /// `source`: that checksum where it is a full-object one, else a CRC64NVME computed
    /// here (S3's default), so the target checks every copy's bytes on arrival.
    pub fn for_copy_of(source: Option<&Checksum>) -> Self {
        match source {
            Some(c) if c.is_full_object() => Self::Known(c.clone()),
            _ => Self::Compute(ChecksumAlgorithm::Crc64Nvme),
        }
    }

    /// For a multipart copy streamed of an object whose stored checksum is `source`: the
    /// algorithm its parts carry (the source's when it has a full-object CRC, else
    /// CRC64NVME), and the full-object value the completed replica must have, if known.
    pub fn for_parts_of(source: Option<&Checksum>) -> (ChecksumAlgorithm, Option<Checksum>) {
        match source {
            Some(c) if c.is_full_object() && c.algorithm.combines() => {
                (c.algorithm, Some(c.clone()))
            }
            _ => (ChecksumAlgorithm::Crc64Nvme, None),
        }
    }

    /// The value sent with `body`: the known one, or one computed here. Computed here, not
    /// by the SDK: with checksums `WhenRequired` (the clients' setting, for S3-compatible
    /// servers) it names the algorithm but sends no value.
    pub fn value_for(&self, body: &[u8]) -> Option<Checksum> {
        match self {
            Self::None => None,
            Self::Known(c) => Some(c.clone()),
            Self::Compute(a) => Some(Checksum::compute(*a, body)),
        }
    }

    /// The algorithm sent, if any.
    pub fn algorithm(&self) -> Option<ChecksumAlgorithm> {
        match self {
            Self::None => None,
            Self::Known(c) => Some(c.algorithm),
            Self::Compute(a) => Some(*a),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // "hello world", as S3's documentation and the SDK's tests give them.
        let data = b"hello world";
        assert_eq!(
            Checksum::compute(ChecksumAlgorithm::Crc32, data).value,
            "DUoRhQ=="
        );
        assert_eq!(
            Checksum::compute(ChecksumAlgorithm::Crc32c, data).value,
            "yZRlqg=="
        );
        assert_eq!(
            Checksum::compute(ChecksumAlgorithm::Sha256, data).value,
            "uU0nuZNNPgilLlLX2n2r+sSE7+N6U4DukIj3rOLvzek="
        );
        assert_eq!(
            Checksum::compute(ChecksumAlgorithm::Sha1, data).value,
            "Kq5sNclPz7QV2+lfQIuc6R7oRu0="
        );
        assert_eq!(
            Checksum::compute(ChecksumAlgorithm::Crc64Nvme, b"")
                .value
                .len(),
            12
        );
    }

    #[test]
    fn composite_values_compare_only_with_their_own_kind() {
        let full = Checksum::from_header(ChecksumAlgorithm::Crc32c, "vUKbMg==", false);
        let composite = Checksum::from_header(ChecksumAlgorithm::Crc32c, "vUKbMg==-3", false);
        assert_eq!(composite.parts, Some(3));
        assert_eq!(composite.value, "vUKbMg==");
        assert_eq!(full.agrees_with(&composite), None);
        let told = Checksum::from_header(ChecksumAlgorithm::Crc32c, "vUKbMg==", true);
        assert_eq!(told.parts, Some(0));
        assert_eq!(told.agrees_with(&composite), Some(true));
        let other = Checksum::from_header(ChecksumAlgorithm::Crc32c, "AAAAAA==-3", false);
        assert_eq!(other.agrees_with(&composite), Some(false));
        let sha = Checksum::from_header(ChecksumAlgorithm::Sha256, "vUKbMg==", false);
        assert_eq!(sha.agrees_with(&full), None);
    }

    #[test]
    fn a_copy_sends_the_source_full_object_checksum_else_a_crc64nvme() {
        let full = Checksum::from_header(ChecksumAlgorithm::Sha256, "abc=", false);
        assert_eq!(
            SentChecksum::for_copy_of(Some(&full)),
            SentChecksum::Known(full.clone())
        );
        let composite = Checksum::from_header(ChecksumAlgorithm::Sha256, "abc=-2", false);
        assert_eq!(
            SentChecksum::for_copy_of(Some(&composite)),
            SentChecksum::Compute(ChecksumAlgorithm::Crc64Nvme)
        );
        assert_eq!(
            SentChecksum::for_copy_of(None),
            SentChecksum::Compute(ChecksumAlgorithm::Crc64Nvme)
        );
    }
}
