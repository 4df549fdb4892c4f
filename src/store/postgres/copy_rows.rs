//! Reading a query's rows through `COPY (query) TO STDOUT (FORMAT binary)`: for the
//! report's scans of millions of rows, where a row of the ordinary protocol costs the
//! client an allocation and a message of its own. The binary format (PostgreSQL's
//! documentation, "COPY", "Binary Format"): a 19-byte header (the signature, flags, the
//! length of a header extension, then the extension), then per row the number of
//! fields (16 bits) and per field its length (32 bits, -1 for NULL) and bytes, ended
//! by a field count of -1. Integers are big-endian; text is its UTF-8 bytes.

use crate::store::report::ScanRow;
use crate::store::{Result, StoreError};
use bytes::{Buf, BytesMut};
use futures_util::{StreamExt, pin_mut};

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// The fields of one row (at most [`MAX_FIELDS`]).
pub(super) struct CopyRow<'a> {
    fields: &'a [Option<&'a [u8]>],
}

/// Fields per row the reader accepts.
const MAX_FIELDS: usize = 16;

fn malformed(what: &str) -> StoreError {
    StoreError::Corrupt(format!("COPY binary output: {what}"))
}

impl ScanRow for CopyRow<'_> {
    fn bytes(&self, at: usize) -> Result<Option<&[u8]>> {
        let field = self
            .fields
            .get(at)
            .ok_or_else(|| malformed("too few fields"))?;
        match field {
            Some(bytes) => std::str::from_utf8(bytes)
                .map(|_| Some(*bytes))
                .map_err(|_| malformed("text that is not UTF-8")),
            None => Ok(None),
        }
    }

    fn int(&self, at: usize) -> Result<i64> {
        self.opt_int(at)?
            .ok_or_else(|| malformed("NULL where a number is required"))
    }

    fn opt_int(&self, at: usize) -> Result<Option<i64>> {
        let field = self
            .fields
            .get(at)
            .ok_or_else(|| malformed("too few fields"))?;
        field
            .map(|bytes| match *bytes {
                [a, b] => Ok(i64::from(i16::from_be_bytes([a, b]))),
                [a, b, c, d] => Ok(i64::from(i32::from_be_bytes([a, b, c, d]))),
                [a, b, c, d, e, f, g, h] => Ok(i64::from_be_bytes([a, b, c, d, e, f, g, h])),
                _ => Err(malformed("an integer of an unknown width")),
            })
            .transpose()
    }
}

/// Where a parse of the buffer stopped.
enum Parsed {
    /// Everything complete was handed on; `consumed` bytes can be dropped.
    More { consumed: usize },
    /// The trailer was met.
    End,
}

/// Hands every complete row in `buffer` to `each`; `header_read` tells whether the
/// header was already taken.
fn parse(
    buffer: &[u8],
    header_read: &mut bool,
    each: &mut impl FnMut(&CopyRow<'_>) -> Result<()>,
) -> Result<Parsed> {
    let mut at = 0;
    if !*header_read {
        if buffer.len() < SIGNATURE.len() + 8 {
            return Ok(Parsed::More { consumed: 0 });
        }
        if &buffer[..SIGNATURE.len()] != SIGNATURE {
            return Err(malformed("no signature"));
        }
        let mut rest = &buffer[SIGNATURE.len() + 4..];
        let extension = usize::try_from(rest.get_u32()).map_err(|_| malformed("header"))?;
        let header = SIGNATURE.len() + 8 + extension;
        if buffer.len() < header {
            return Ok(Parsed::More { consumed: 0 });
        }
        at = header;
        *header_read = true;
    }
    let mut fields: [Option<&[u8]>; MAX_FIELDS] = [None; MAX_FIELDS];
    loop {
        let mut cursor = &buffer[at..];
        if cursor.len() < 2 {
            return Ok(Parsed::More { consumed: at });
        }
        let count = cursor.get_i16();
        if count == -1 {
            return Ok(Parsed::End);
        }
        let count = usize::try_from(count).map_err(|_| malformed("a negative field count"))?;
        if count > MAX_FIELDS {
            return Err(malformed("too many fields"));
        }
        let mut complete = true;
        for field in fields.iter_mut().take(count) {
            if cursor.len() < 4 {
                complete = false;
                break;
            }
            let length = cursor.get_i32();
            if length == -1 {
                *field = None;
                continue;
            }
            let length = usize::try_from(length).map_err(|_| malformed("a field length"))?;
            if cursor.len() < length {
                complete = false;
                break;
            }
            *field = Some(&cursor[..length]);
            cursor.advance(length);
        }
        if !complete {
            return Ok(Parsed::More { consumed: at });
        }
        each(&CopyRow {
            fields: &fields[..count],
        })?;
        at = buffer.len() - cursor.len();
    }
}

/// Runs `query` (a SELECT, no parameters) through binary COPY and hands each row to
/// `each`, in the order the server sends them.
pub(super) async fn copy_rows(
    client: &tokio_postgres::Client,
    query: &str,
    mut each: impl FnMut(&CopyRow<'_>) -> Result<()>,
) -> Result<()> {
    let stream = client
        .copy_out(&format!("COPY ({query}) TO STDOUT (FORMAT binary)"))
        .await?;
    pin_mut!(stream);
    let mut buffer = BytesMut::new();
    let mut header_read = false;
    let mut ended = false;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if ended {
            continue;
        }
        buffer.extend_from_slice(&chunk);
        match parse(&buffer, &mut header_read, &mut each)? {
            Parsed::More { consumed } => buffer.advance(consumed),
            Parsed::End => ended = true,
        }
    }
    if !ended {
        return Err(malformed("no trailer"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binary COPY of two rows, (7, 'sales', NULL) and (-1, 'x', 300 as int4), cut
    /// at every byte: the rows come out whole and the same wherever the chunks end.
    #[test]
    fn rows_split_across_chunks_read_the_same() {
        let mut data = SIGNATURE.to_vec();
        data.extend_from_slice(&0_u32.to_be_bytes());
        data.extend_from_slice(&2_u32.to_be_bytes());
        data.extend_from_slice(b"xx");
        let mut row = |int: i64, text: &[u8], last: Option<i32>| {
            data.extend_from_slice(&3_i16.to_be_bytes());
            data.extend_from_slice(&8_i32.to_be_bytes());
            data.extend_from_slice(&int.to_be_bytes());
            data.extend_from_slice(&(text.len() as i32).to_be_bytes());
            data.extend_from_slice(text);
            match last {
                Some(value) => {
                    data.extend_from_slice(&4_i32.to_be_bytes());
                    data.extend_from_slice(&value.to_be_bytes());
                }
                None => data.extend_from_slice(&(-1_i32).to_be_bytes()),
            }
        };
        row(7, b"sales", None);
        row(-1, b"x", Some(300));
        data.extend_from_slice(&(-1_i16).to_be_bytes());
        for cut in 0..data.len() {
            let mut seen = Vec::new();
            let mut each = |row: &CopyRow<'_>| {
                seen.push((
                    row.int(0)?,
                    String::from_utf8(row.bytes(1)?.unwrap().to_vec()).unwrap(),
                    row.opt_int(2)?,
                ));
                Ok(())
            };
            let mut buffer = BytesMut::new();
            let mut header_read = false;
            let mut ended = false;
            for chunk in [&data[..cut], &data[cut..]] {
                buffer.extend_from_slice(chunk);
                match parse(&buffer, &mut header_read, &mut each).unwrap() {
                    Parsed::More { consumed } => buffer.advance(consumed),
                    Parsed::End => ended = true,
                }
            }
            assert!(ended, "cut at {cut}");
            assert_eq!(
                seen,
                [
                    (7, "sales".to_owned(), None),
                    (-1, "x".to_owned(), Some(300))
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_truncated_or_foreign_stream_is_an_error_not_a_panic() {
        let mut header_read = false;
        let mut each = |_: &CopyRow<'_>| Ok(());
        assert!(parse(b"NOTPGCOPY-----------", &mut header_read, &mut each).is_err());
        let mut data = SIGNATURE.to_vec();
        data.extend_from_slice(&[0; 8]);
        data.extend_from_slice(&40_i16.to_be_bytes());
        assert!(
            parse(&data, &mut header_read, &mut each).is_err(),
            "40 fields"
        );
    }
}
