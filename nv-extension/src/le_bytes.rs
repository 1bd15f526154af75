//! The fixed-size on-media records (superblock copy, VM-table header and entry, state-slot
//! header, save report) are `#[repr(C)]` structs of little-endian `zerocopy` fields whose
//! layout is the one in `docs/nv-format.md`: the structs are the format, and their bytes are
//! what is written. Every field type has alignment 1, so there is no hidden padding; gaps are
//! named `reserved` fields, written as zero and ignored when read. [`le_record!`] declares each
//! one with its documented offsets and checks them when compiling.

pub(crate) use zerocopy::little_endian::{U16, U32, U64};
pub(crate) use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes};

/// Declares an on-media record: a `#[repr(C)]` zerocopy struct whose fields are listed with
/// their documented offsets (docs/nv-format.md), and compile-time assertions that the struct
/// has exactly that layout and size, so the code cannot drift from the format.
macro_rules! le_record {
    (
        $(#[$meta:meta])*
        struct $name:ident($size:expr) {
            $($(#[$field_meta:meta])* $offset:literal => $field:ident: $type:ty,)*
        }
    ) => {
        $(#[$meta])*
        #[derive(
            zerocopy::FromBytes, zerocopy::IntoBytes, zerocopy::KnownLayout, zerocopy::Immutable,
        )]
        #[repr(C)]
        struct $name {
            $($(#[$field_meta])* $field: $type,)*
        }

        const _: () = {
            assert!(std::mem::size_of::<$name>() == $size);
            $(assert!(std::mem::offset_of!($name, $field) == $offset);)*
        };
    };
}
pub(crate) use le_record;

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

    le_record! {
        struct Sample(10) {
            0 => half: U16,
            2 => word: U32,
            6 => crc: U32,
        }
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
