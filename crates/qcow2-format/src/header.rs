//! The image header (versions 2 and 3) and its extensions.

use crate::{
    align_up, be32, be64, FormatError, COMPRESSION_DEFLATE, COMPRESSION_ZSTD, INCOMPAT_COMPRESSION,
    INCOMPAT_DATA_FILE, INCOMPAT_EXTL2, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES,
    MAX_REFTABLE_BYTES, MAX_SNAPSHOTS, MIN_CLUSTER_BITS,
};

/// `QFI\xfb`, the first four bytes of every qcow2 image.
pub const MAGIC: u32 = 0x5146_49fb;
/// Header extension naming the backing file's format.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension naming feature bits for error messages.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension describing persistent dirty bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension for full-disk encryption.
pub const EXT_ENCRYPTION: u32 = 0x0537_be77;
/// Header extension naming an external data file.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

const V2_HEADER_LEN: usize = 72;
const V3_MIN_HEADER_LEN: u32 = 104;
/// Header length QEMU writes for version 3 (with the compression type field).
const V3_HEADER_LEN: u32 = 112;

/// One header extension, kept byte for byte so unknown ones survive rewrites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderExtension {
    /// Extension type magic.
    pub kind: u32,
    /// Extension payload, without padding.
    pub data: Vec<u8>,
}

/// A backing-format name recorded in the header, as QEMU writes it.
pub type BackingFormat = String;

/// The decoded image header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 (compat 0.10) or 3 (compat 1.1).
    pub version: u32,
    /// Where the backing file name is stored, 0 for none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Encryption method (0 = none; anything else is unsupported here).
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters occupied by the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3).
    pub compatible_features: u64,
    /// Autoclear feature bits (v3).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (4 for v2).
    pub refcount_order: u32,
    /// Header length in bytes (72 for v2).
    pub header_length: u32,
    /// Bytes 104..header_length of a v3 header (compression type and any later fields).
    pub tail: Vec<u8>,
    /// Header extensions in file order, the end marker excluded.
    pub extensions: Vec<HeaderExtension>,
}

impl Header {
    /// A fresh header as QEMU would write for a new image (tables filled in by the caller).
    pub fn new(version: u32, cluster_bits: u32, refcount_order: u32, size: u64) -> Self {
        let (header_length, tail) = if version >= 3 {
            (
                V3_HEADER_LEN,
                vec![0u8; (V3_HEADER_LEN - V3_MIN_HEADER_LEN) as usize],
            )
        } else {
            (V2_HEADER_LEN as u32, Vec::new())
        };
        Header {
            version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order,
            header_length,
            tail,
            extensions: Vec::new(),
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Bytes of guest data one L1 entry maps.
    pub fn bytes_per_l1_entry(&self) -> u64 {
        self.cluster_size() * self.l2_entries()
    }

    /// L1 entries needed to map `size` guest bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.bytes_per_l1_entry())
    }

    /// Compression type in effect (0 deflate, 1 zstd).
    pub fn compression_type(&self) -> u8 {
        if self.incompatible_features & INCOMPAT_COMPRESSION != 0 {
            self.tail.first().copied().unwrap_or(COMPRESSION_DEFLATE)
        } else {
            COMPRESSION_DEFLATE
        }
    }

    /// The payload of the first extension of `kind`, if any.
    pub fn extension(&self, kind: u32) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| e.data.as_slice())
    }

    /// Replaces (or adds, or with None removes) the extension of `kind`.
    ///
    /// A new extension goes first, where QEMU puts the backing format.
    pub fn set_extension(&mut self, kind: u32, data: Option<Vec<u8>>) {
        match data {
            None => self.extensions.retain(|e| e.kind != kind),
            Some(data) => {
                if let Some(e) = self.extensions.iter_mut().find(|e| e.kind == kind) {
                    e.data = data;
                } else {
                    self.extensions.insert(0, HeaderExtension { kind, data });
                }
            }
        }
    }

    /// The backing format named by the backing-format extension.
    pub fn backing_format(&self) -> Option<BackingFormat> {
        self.extension(EXT_BACKING_FORMAT).map(|d| {
            String::from_utf8_lossy(d)
                .trim_end_matches('\0')
                .to_string()
        })
    }

    /// Names of incompatible feature bits set but not understood by `known`.
    ///
    /// Uses the image's feature name table where it has one, like QEMU's message.
    pub fn unknown_incompatible(&self, known: u64) -> Vec<String> {
        let unknown = self.incompatible_features & !known;
        (0..64)
            .filter(|bit| unknown & (1u64 << bit) != 0)
            .map(|bit| {
                self.feature_name(0, bit)
                    .unwrap_or_else(|| format!("unknown incompatible feature bit {bit}"))
            })
            .collect()
    }

    fn feature_name(&self, kind: u8, bit: u32) -> Option<String> {
        let table = self.extension(EXT_FEATURE_TABLE)?;
        table.chunks_exact(48).find_map(|e| {
            (e[0] == kind && u32::from(e[1]) == bit).then(|| {
                let name = &e[2..48];
                let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                String::from_utf8_lossy(&name[..end]).into_owned()
            })
        })
    }

    /// Byte range of the backing file name, if the header names one.
    pub fn backing_name_range(&self) -> Option<(u64, u32)> {
        (self.backing_file_offset != 0 && self.backing_file_size != 0)
            .then_some((self.backing_file_offset, self.backing_file_size))
    }

    /// Decodes a header and its extensions from the start of an image.
    ///
    /// `buf` is the beginning of the file (ideally its whole first cluster).
    /// Checks every field whose validity does not depend on the file's length.
    pub fn decode(buf: &[u8]) -> Result<Header, FormatError> {
        if buf.len() < 4 {
            return Err(FormatError::truncated("header", 4, buf.len()));
        }
        if be32(buf, 0) != MAGIC {
            return Err(FormatError::BadMagic);
        }
        if buf.len() < V2_HEADER_LEN {
            return Err(FormatError::truncated(
                "header",
                V2_HEADER_LEN as u64,
                buf.len(),
            ));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(FormatError::Unsupported {
                feature: format!("qcow2 version {version}"),
            });
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(FormatError::invalid(
                "cluster_bits",
                format!("{cluster_bits} (cluster size must be 512 B to 2 MiB)"),
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            tail: Vec::new(),
            extensions: Vec::new(),
        };
        if version >= 3 {
            if buf.len() < V3_MIN_HEADER_LEN as usize {
                return Err(FormatError::truncated(
                    "version 3 header",
                    V3_MIN_HEADER_LEN.into(),
                    buf.len(),
                ));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_MIN_HEADER_LEN {
                return Err(FormatError::invalid(
                    "header_length",
                    format!("{} is shorter than 104 bytes", h.header_length),
                ));
            }
            if h.header_length % 8 != 0 {
                return Err(FormatError::invalid(
                    "header_length",
                    format!("{} is not a multiple of 8", h.header_length),
                ));
            }
            if u64::from(h.header_length) > cluster_size {
                return Err(FormatError::invalid(
                    "header_length",
                    format!("{} exceeds the cluster size", h.header_length),
                ));
            }
            if h.header_length as usize > buf.len() {
                return Err(FormatError::truncated(
                    "header",
                    h.header_length.into(),
                    buf.len(),
                ));
            }
            h.tail = buf[V3_MIN_HEADER_LEN as usize..h.header_length as usize].to_vec();
        }
        h.validate_fields()?;
        h.extensions = decode_extensions(buf, &h)?;
        Ok(h)
    }

    /// Checks the fields that must hold whatever the file length.
    fn validate_fields(&self) -> Result<(), FormatError> {
        let cluster_size = self.cluster_size();
        if self.refcount_order > 6 {
            return Err(FormatError::invalid(
                "refcount_order",
                format!(
                    "{} (refcount width must be 1 to 64 bits)",
                    self.refcount_order
                ),
            ));
        }
        if self.size > i64::MAX as u64 {
            return Err(FormatError::invalid(
                "size",
                format!("{} is larger than QEMU supports", self.size),
            ));
        }
        if u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            return Err(FormatError::invalid(
                "l1_size",
                format!("{} entries: active L1 table too large", self.l1_size),
            ));
        }
        if u64::from(self.l1_size) < self.l1_entries_for(self.size) {
            return Err(FormatError::invalid(
                "l1_size",
                format!(
                    "{} entries: L1 table is too small for a {}-byte disk",
                    self.l1_size, self.size
                ),
            ));
        }
        if u64::from(self.refcount_table_clusters) * cluster_size > MAX_REFTABLE_BYTES {
            return Err(FormatError::invalid(
                "refcount_table_clusters",
                format!(
                    "{}: reference count table too large",
                    self.refcount_table_clusters
                ),
            ));
        }
        if self.refcount_table_clusters == 0 {
            return Err(FormatError::invalid(
                "refcount_table_clusters",
                "0: the image has no refcount table",
            ));
        }
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(FormatError::invalid(
                "nb_snapshots",
                format!("{}: too many snapshots", self.nb_snapshots),
            ));
        }
        for (field, offset) in [
            ("l1_table_offset", self.l1_table_offset),
            ("refcount_table_offset", self.refcount_table_offset),
            ("snapshots_offset", self.snapshots_offset),
        ] {
            if offset % cluster_size != 0 {
                return Err(FormatError::invalid(
                    field,
                    format!("{offset:#x} is not cluster aligned"),
                ));
            }
            if offset > crate::MAX_HOST_OFFSET {
                return Err(FormatError::invalid(
                    field,
                    format!("{offset:#x} is too large"),
                ));
            }
        }
        if self.l1_size > 0 && self.l1_table_offset == 0 {
            return Err(FormatError::invalid(
                "l1_table_offset",
                "0 overlaps the header",
            ));
        }
        if self.refcount_table_offset == 0 {
            return Err(FormatError::invalid(
                "refcount_table_offset",
                "0 overlaps the header",
            ));
        }
        if self.nb_snapshots > 0 && self.snapshots_offset == 0 {
            return Err(FormatError::invalid(
                "snapshots_offset",
                "0 overlaps the header",
            ));
        }
        if self.backing_file_size > MAX_BACKING_NAME {
            return Err(FormatError::invalid(
                "backing_file_size",
                format!("{}: backing file name too long", self.backing_file_size),
            ));
        }
        if self.backing_file_offset != 0
            && self
                .backing_file_offset
                .checked_add(self.backing_file_size.into())
                .map_or(true, |end| end > cluster_size)
        {
            return Err(FormatError::invalid(
                "backing_file_offset",
                format!(
                    "{:#x}: backing file name is outside the first cluster",
                    self.backing_file_offset
                ),
            ));
        }
        if self.crypt_method != 0 {
            return Err(FormatError::Unsupported {
                feature: format!("encryption method {}", self.crypt_method),
            });
        }
        if self.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(FormatError::Unsupported {
                feature: "external data file".into(),
            });
        }
        if self.incompatible_features & INCOMPAT_EXTL2 != 0 {
            return Err(FormatError::Unsupported {
                feature: "extended L2 entries (subclusters)".into(),
            });
        }
        let ctype = self.tail.first().copied().unwrap_or(0);
        if self.incompatible_features & INCOMPAT_COMPRESSION == 0 {
            if ctype != COMPRESSION_DEFLATE {
                return Err(FormatError::invalid(
                    "compression_type",
                    format!("{ctype} without the compression type feature bit"),
                ));
            }
        } else if ctype != COMPRESSION_DEFLATE && ctype != COMPRESSION_ZSTD {
            return Err(FormatError::Unsupported {
                feature: format!("compression type {ctype}"),
            });
        }
        Ok(())
    }

    /// Encodes the header, its extensions, the end marker and `backing_name`.
    ///
    /// Sets `backing_file_offset`/`backing_file_size` to where the name lands.
    /// Refuses output larger than one cluster (the header must fit the first cluster).
    pub fn encode(&mut self, backing_name: Option<&str>) -> Result<Vec<u8>, FormatError> {
        let mut out = vec![0u8; self.header_length.max(V2_HEADER_LEN as u32) as usize];
        let mut body = Vec::with_capacity(512);
        for ext in &self.extensions {
            body.extend_from_slice(&ext.kind.to_be_bytes());
            let len = u32::try_from(ext.data.len()).map_err(|_| FormatError::TooLarge {
                what: "header extension",
                detail: format!("{} bytes", ext.data.len()),
            })?;
            body.extend_from_slice(&len.to_be_bytes());
            body.extend_from_slice(&ext.data);
            body.resize(align_up(body.len() as u64, 8) as usize, 0);
        }
        body.extend_from_slice(&[0u8; 8]);
        match backing_name {
            Some(name) if !name.is_empty() => {
                if name.len() > MAX_BACKING_NAME as usize {
                    return Err(FormatError::invalid(
                        "backing file name",
                        format!("{} bytes is longer than 1023", name.len()),
                    ));
                }
                self.backing_file_offset = (out.len() + body.len()) as u64;
                self.backing_file_size = name.len() as u32;
                body.extend_from_slice(name.as_bytes());
            }
            _ => {
                self.backing_file_offset = 0;
                self.backing_file_size = 0;
            }
        }
        out.extend_from_slice(&body);
        if out.len() as u64 > self.cluster_size() {
            return Err(FormatError::TooLarge {
                what: "header",
                detail: format!(
                    "{} bytes with extensions exceed the {}-byte cluster",
                    out.len(),
                    self.cluster_size()
                ),
            });
        }
        self.encode_fields(&mut out);
        Ok(out)
    }

    /// Writes the fixed fields into `out` (at least header_length bytes).
    pub fn encode_fields(&self, out: &mut [u8]) {
        let put32 = |out: &mut [u8], off: usize, v: u32| {
            out[off..off + 4].copy_from_slice(&v.to_be_bytes())
        };
        let put64 = |out: &mut [u8], off: usize, v: u64| {
            out[off..off + 8].copy_from_slice(&v.to_be_bytes())
        };
        put32(out, 0, MAGIC);
        put32(out, 4, self.version);
        put64(out, 8, self.backing_file_offset);
        put32(out, 16, self.backing_file_size);
        put32(out, 20, self.cluster_bits);
        put64(out, 24, self.size);
        put32(out, 32, self.crypt_method);
        put32(out, 36, self.l1_size);
        put64(out, 40, self.l1_table_offset);
        put64(out, 48, self.refcount_table_offset);
        put32(out, 56, self.refcount_table_clusters);
        put32(out, 60, self.nb_snapshots);
        put64(out, 64, self.snapshots_offset);
        if self.version >= 3 {
            put64(out, 72, self.incompatible_features);
            put64(out, 80, self.compatible_features);
            put64(out, 88, self.autoclear_features);
            put32(out, 96, self.refcount_order);
            put32(out, 100, self.header_length);
            let end = (V3_MIN_HEADER_LEN as usize + self.tail.len()).min(out.len());
            out[V3_MIN_HEADER_LEN as usize..end]
                .copy_from_slice(&self.tail[..end - V3_MIN_HEADER_LEN as usize]);
        }
    }
}

fn decode_extensions(buf: &[u8], h: &Header) -> Result<Vec<HeaderExtension>, FormatError> {
    let start = h.header_length as u64;
    let mut end = if h.backing_file_offset > start {
        h.backing_file_offset
    } else {
        h.cluster_size()
    };
    end = end.min(buf.len() as u64);
    let mut exts = Vec::new();
    let mut offset = start;
    while offset + 8 <= end {
        let o = offset as usize;
        let kind = be32(buf, o);
        let len = u64::from(be32(buf, o + 4));
        if kind == 0 {
            break;
        }
        if len > end - offset - 8 {
            return Err(FormatError::invalid(
                "header extension",
                format!("extension {kind:#x} at {offset:#x} is {len} bytes, past the header area"),
            ));
        }
        exts.push(HeaderExtension {
            kind,
            data: buf[o + 8..o + 8 + len as usize].to_vec(),
        });
        offset = align_up(offset + 8 + len, 8);
    }
    Ok(exts)
}

/// The feature name table QEMU 7.2 writes into new version 3 images.
pub fn qemu_feature_table() -> Vec<u8> {
    let names: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut out = Vec::with_capacity(names.len() * 48);
    for (kind, bit, name) in names {
        let mut e = [0u8; 48];
        e[0] = kind;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        out.extend_from_slice(&e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(version: u32) -> Header {
        let mut h = Header::new(version, 16, 4, 1 << 30);
        h.l1_size = 2;
        h.l1_table_offset = 0x30000;
        h.refcount_table_offset = 0x10000;
        h.refcount_table_clusters = 1;
        h
    }

    #[test]
    fn v3_round_trip_keeps_unknown_extensions_and_backing() {
        let mut h = sample(3);
        h.set_extension(EXT_FEATURE_TABLE, Some(qemu_feature_table()));
        h.extensions.push(HeaderExtension {
            kind: 0x1234_5678,
            data: vec![1, 2, 3],
        });
        h.set_extension(EXT_BACKING_FORMAT, Some(b"raw".to_vec()));
        let bytes = h.encode(Some("base.img")).unwrap();
        let d = Header::decode(&bytes).unwrap();
        assert_eq!(d, h);
        assert_eq!(d.backing_format().as_deref(), Some("raw"));
        let (off, len) = d.backing_name_range().unwrap();
        assert_eq!(
            &bytes[off as usize..(off + u64::from(len)) as usize],
            b"base.img"
        );
        assert_eq!(d.extensions[0].kind, EXT_BACKING_FORMAT);
        assert_eq!(d.header_length, 112);
    }

    #[test]
    fn v2_round_trip() {
        let mut h = sample(2);
        let bytes = h.encode(None).unwrap();
        assert_eq!(bytes.len(), 72 + 8);
        assert_eq!(Header::decode(&bytes).unwrap(), h);
    }

    #[test]
    fn refuses_bad_fields() {
        let mut h = sample(3);
        let good = h.encode(None).unwrap();
        let poke = |off: usize, bytes: &[u8]| {
            let mut b = good.clone();
            b[off..off + bytes.len()].copy_from_slice(bytes);
            Header::decode(&b)
        };
        assert_eq!(poke(0, b"QFI\0"), Err(FormatError::BadMagic));
        assert!(poke(4, &4u32.to_be_bytes()).is_err());
        assert!(poke(20, &8u32.to_be_bytes()).is_err());
        assert!(poke(20, &22u32.to_be_bytes()).is_err());
        assert!(poke(36, &u32::MAX.to_be_bytes()).is_err());
        assert!(
            poke(36, &1u32.to_be_bytes()).is_err(),
            "L1 too small for 1 GiB"
        );
        assert!(poke(60, &u32::MAX.to_be_bytes()).is_err());
        assert!(poke(56, &u32::MAX.to_be_bytes()).is_err());
        assert!(poke(40, &0x30001u64.to_be_bytes()).is_err());
        assert!(poke(96, &7u32.to_be_bytes()).is_err());
        assert!(poke(100, &100u32.to_be_bytes()).is_err());
        assert!(poke(32, &1u32.to_be_bytes()).is_err());
        assert!(poke(72, &INCOMPAT_EXTL2.to_be_bytes()).is_err());
        assert!(poke(104, &[1]).is_err(), "zstd without the feature bit");
        assert!(poke(24, &u64::MAX.to_be_bytes()).is_err());
        // An extension claiming more bytes than the header area holds.
        let mut b = good.clone();
        b[112..116].copy_from_slice(&0x1111u32.to_be_bytes());
        b[116..120].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Header::decode(&b).is_err());
        for len in 0..good.len() {
            let _ = Header::decode(&good[..len]);
        }
    }

    #[test]
    fn names_unknown_incompatible_bits() {
        let mut h = sample(3);
        h.set_extension(EXT_FEATURE_TABLE, Some(qemu_feature_table()));
        h.incompatible_features = crate::INCOMPAT_DIRTY | (1 << 40);
        assert_eq!(
            h.unknown_incompatible(crate::INCOMPAT_KNOWN),
            vec!["unknown incompatible feature bit 40".to_string()]
        );
        h.incompatible_features = INCOMPAT_DATA_FILE;
        assert_eq!(
            h.unknown_incompatible(0),
            vec!["external data file".to_string()]
        );
    }
}
