//! CRC-32 (IEEE 802.3, as in zlib and PNG) for snapshot checksums.
//!
//! Arrow IPC files carry no checksums of their own, so a flipped bit in a token id would
//! otherwise restore silently, and a damaged length prefix can make Arrow's reader allocate
//! without bound before it notices anything wrong.

use std::io::{self, Write};

/// Reflected form of the IEEE polynomial 0x04C11DB7.
const POLYNOMIAL: u32 = 0xEDB8_8320;

const TABLE: [u32; 256] = table();

const fn table() -> [u32; 256] {
    let mut table = [0_u32; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut crc = byte as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ POLYNOMIAL
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[byte] = crc;
        byte += 1;
    }
    table
}

/// A running CRC-32.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Crc32 {
    state: u32,
}

impl Crc32 {
    pub(crate) fn new() -> Self {
        Crc32 { state: !0 }
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            let index = (self.state ^ u32::from(byte)) & 0xFF;
            self.state = (self.state >> 8) ^ TABLE[index as usize];
        }
    }

    pub(crate) fn finish(self) -> u32 {
        !self.state
    }
}

/// The CRC-32 of `bytes`.
pub(crate) fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = Crc32::new();
    crc.update(bytes);
    crc.finish()
}

/// Passes writes through, keeping the CRC-32 and count of the bytes written so far.
#[derive(Debug)]
pub(crate) struct HashingWriter<W> {
    inner: W,
    crc: Crc32,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            crc: Crc32::new(),
            written: 0,
        }
    }

    /// Bytes written so far and their CRC-32.
    pub(crate) fn digest(&self) -> (u64, u32) {
        (self.written, self.crc.finish())
    }

    pub(crate) fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.crc.update(&buf[..written]);
        self.written += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::{crc32, HashingWriter};

    /// The check value of CRC-32/ISO-HDLC from the CRC catalogue, also what
    /// `python3 -c 'import zlib; print(hex(zlib.crc32(b"123456789")))'` prints.
    #[test]
    fn matches_the_catalogue_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    /// `python3 -c 'import zlib; print(hex(zlib.crc32(bytes(range(256)) * 4)))'`
    #[test]
    fn matches_zlib_on_every_byte_value() {
        let bytes: Vec<u8> = (0..1024).map(|i| (i % 256) as u8).collect();
        assert_eq!(crc32(&bytes), ZLIB_EVERY_BYTE_X4);
    }

    const ZLIB_EVERY_BYTE_X4: u32 = 0xB70B_4C26;

    #[test]
    fn hashing_writer_sees_every_byte_in_pieces() {
        let mut writer = HashingWriter::new(Vec::new());
        writer.write_all(b"1234").expect("write to a Vec");
        writer.write_all(b"56789").expect("write to a Vec");

        assert_eq!(writer.digest(), (9, 0xCBF4_3926));
        assert_eq!(writer.into_inner(), b"123456789");
    }
}
