//! The fixed-size on-media records (superblock copy, VM-table header and entry, state-slot
//! header, save report) are `#[repr(C)]` structs of little-endian `zerocopy` fields whose
//! layout is the one in `docs/nv-format.md`: the structs are the format, and their bytes are
//! what is written. Every field type has alignment 1, so there is no hidden padding; gaps are
//! named `reserved` fields, written as zero and ignored when read. Each struct asserts its size.

pub(crate) use zerocopy::little_endian::{U16, U32, U64};
pub(crate) use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

/// Asserts at compile time that `$record` has the documented size and field offsets
/// (docs/nv-format.md), so the struct cannot drift from the format.
macro_rules! documented_layout {
    ($record:ty, size $size:expr, { $($field:ident: $offset:expr),* $(,)? }) => {
        const _: () = {
            assert!(std::mem::size_of::<$record>() == $size);
            $(assert!(std::mem::offset_of!($record, $field) == $offset);)*
        };
    };
}
pub(crate) use documented_layout;

/// The CRC32C of a record's bytes before its last four, which hold that checksum (every
/// record ends with one).
pub(crate) fn trailing_crc_of<T: IntoBytes + Immutable>(record: &T) -> u32 {
    let bytes = record.as_bytes();
    crc32c::crc32c(&bytes[..bytes.len() - 4])
}

/// Whether the last four bytes of `record` are the checksum [`trailing_crc_of`] computes.
pub(crate) fn trailing_crc_holds<T: IntoBytes + Immutable>(record: &T) -> bool {
    let bytes = record.as_bytes();
    let (fields, stored) = bytes.split_at(bytes.len() - 4);
    stored == crc32c::crc32c(fields).to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
    #[repr(C)]
    struct Sample {
        half: U16,
        word: U32,
        crc: U32,
    }

    #[test]
    fn fields_are_little_endian_without_padding_and_the_crc_is_the_tail() {
        let mut sample = Sample {
            half: U16::new(0x0201),
            word: U32::new(0x0605_0403),
            crc: U32::ZERO,
        };
        assert_eq!(&sample.as_bytes()[..6], &[1, 2, 3, 4, 5, 6]);
        assert!(!trailing_crc_holds(&sample));
        sample.crc = trailing_crc_of(&sample).into();
        assert_eq!(sample.crc.get(), crc32c::crc32c(&[1, 2, 3, 4, 5, 6]));
        assert!(trailing_crc_holds(&sample));
    }
}
