//! Little-endian field access at explicit byte offsets.
//!
//! On-disk structures are encoded field by field through these helpers so the
//! layout in `docs/nv-format.md` is the layout in the code; no Rust struct is
//! ever copied to the medium as is.

pub(crate) fn put_u16(buf: &mut [u8], offset: usize, value: u16) {
    buf[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
}

pub(crate) fn put_u32(buf: &mut [u8], offset: usize, value: u32) {
    buf[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

pub(crate) fn put_u64(buf: &mut [u8], offset: usize, value: u64) {
    buf[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
}

pub(crate) fn get_u16(buf: &[u8], offset: usize) -> u16 {
    let mut bytes = [0u8; 2];
    bytes.copy_from_slice(&buf[offset..offset + 2]);
    u16::from_le_bytes(bytes)
}

pub(crate) fn get_u32(buf: &[u8], offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&buf[offset..offset + 4]);
    u32::from_le_bytes(bytes)
}

pub(crate) fn get_u64(buf: &[u8], offset: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&buf[offset..offset + 8]);
    u64::from_le_bytes(bytes)
}

pub(crate) fn get_array<const N: usize>(buf: &[u8], offset: usize) -> [u8; N] {
    let mut bytes = [0u8; N];
    bytes.copy_from_slice(&buf[offset..offset + N]);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_little_endian_at_their_offsets() {
        let mut buf = [0u8; 16];
        put_u32(&mut buf, 2, 0x0403_0201);
        put_u16(&mut buf, 8, 0x0605);
        assert_eq!(&buf[..10], &[0, 0, 1, 2, 3, 4, 0, 0, 5, 6]);
        assert_eq!(get_u32(&buf, 2), 0x0403_0201);
        assert_eq!(get_u16(&buf, 8), 0x0605);
        put_u64(&mut buf, 8, u64::MAX - 1);
        assert_eq!(get_u64(&buf, 8), u64::MAX - 1);
        assert_eq!(get_array::<2>(&buf, 8), [0xfe, 0xff]);
    }
}
