//! Files a contributor uploads, as contributions: the text of `.txt`, `.md`, `.pdf` and
//! `.docx` files ([`extract_text`]), split on paragraph boundaries into chunks of at most a
//! given size ([`chunk`]), each signed by the contributor's key as one
//! `contribution.submitted` ([`contributions`]).
//!
//! Event ids are derived from the contribution id and the contributor, so submitting the
//! same file again is a no-op (the events are duplicates), and each chunk's `source` is
//! `<file name>#<chunk index>`.

use std::io::Read;
use std::path::Path;

use chrono::{DateTime, Utc};
use ledgerlake_lakehouse::events::ContributionSubmitted;
use ledgerlake_lakehouse::ids::{ContributionId, DatanetId, Sha256Hex};
use ledgerlake_lakehouse::messages;

use crate::Error;
use crate::sign::Keypair;

/// Most bytes of one contribution's content (the contract's limit).
pub const MAX_CONTENT_BYTES: usize = 256 * 1024;

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Document { path: path.display().to_string(), reason: reason.into() }
}

/// The text of a document, by its extension: `.txt` and `.md` as UTF-8, `.pdf` through
/// `pdf-extract`, `.docx` from its `word/document.xml`. Paragraphs are separated by a blank
/// line. Anything else, or a file that does not parse, is refused naming the file.
pub fn extract_text(path: &Path) -> Result<String, Error> {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
    let bytes = std::fs::read(path).map_err(|e| bad(path, e.to_string()))?;
    let text = match ext.as_str() {
        "txt" | "md" | "markdown" => String::from_utf8(bytes).map_err(|_| bad(path, "not UTF-8 text"))?.replace("\r\n", "\n"),
        "pdf" => pdf_text(path, &bytes)?,
        "docx" => docx_text(path, &bytes)?,
        _ => return Err(bad(path, "unsupported file type: give .txt, .md, .pdf or .docx")),
    };
    Ok(text)
}

/// PDF text: pdf-extract's lines, with the lines of a paragraph joined by spaces (a PDF
/// breaks lines where the page did). pdf-extract can panic on malformed files; that is
/// caught and reported as a bad document.
fn pdf_text(path: &Path, bytes: &[u8]) -> Result<String, Error> {
    let extracted = std::panic::catch_unwind(|| pdf_extract::extract_text_from_mem(bytes));
    let raw = match extracted {
        Ok(Ok(text)) => text,
        Ok(Err(e)) => return Err(bad(path, format!("not a readable PDF: {e}"))),
        Err(_) => return Err(bad(path, "not a readable PDF (the PDF parser failed)")),
    };
    let paragraphs: Vec<String> = paragraphs(&raw).map(|p| p.split_whitespace().collect::<Vec<_>>().join(" ")).collect();
    Ok(paragraphs.join("\n\n"))
}

/// The most bytes `word/document.xml` of a DOCX may expand to (its markup around the text).
pub const MAX_DOCX_XML_BYTES: usize = 64 * 1024 * 1024;

/// DOCX text: every `<w:p>` of `word/document.xml` is a paragraph, its `<w:t>` runs its
/// text, `<w:tab/>` a tab and `<w:br/>` a line break.
fn docx_text(path: &Path, bytes: &[u8]) -> Result<String, Error> {
    use quick_xml::events::Event as Xml;
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| bad(path, format!("not a DOCX (zip) file: {e}")))?;
    let mut xml = String::new();
    // Read at most MAX_DOCX_XML_BYTES, whatever the archive claims: a small zip can expand
    // to gigabytes (a zip bomb), and this is all the text a document may bring.
    let entry = archive.by_name("word/document.xml").map_err(|_| bad(path, "not a DOCX file: no word/document.xml"))?;
    let read = entry
        .take(MAX_DOCX_XML_BYTES as u64 + 1)
        .read_to_string(&mut xml)
        .map_err(|e| bad(path, format!("word/document.xml: {e}")))?;
    if read > MAX_DOCX_XML_BYTES {
        return Err(bad(path, format!("word/document.xml expands past {MAX_DOCX_XML_BYTES} bytes; split the document")));
    }
    let mut reader = quick_xml::Reader::from_str(&xml);
    let (mut out, mut paragraph, mut in_text) = (Vec::<String>::new(), String::new(), false);
    loop {
        match reader.read_event().map_err(|e| bad(path, format!("word/document.xml: {e}")))? {
            Xml::Start(e) if e.name().as_ref() == b"w:t" => in_text = true,
            Xml::End(e) if e.name().as_ref() == b"w:t" => in_text = false,
            Xml::Text(t) if in_text => {
                let text = t.decode().map_err(|e| bad(path, format!("word/document.xml: {e}")))?;
                paragraph.push_str(&quick_xml::escape::unescape(&text).map_err(|e| bad(path, format!("word/document.xml: {e}")))?);
            }
            Xml::GeneralRef(r) if in_text => {
                let name = r.decode().map_err(|e| bad(path, format!("word/document.xml: {e}")))?;
                let entity = format!("&{name};");
                paragraph.push_str(&quick_xml::escape::unescape(&entity).map_err(|e| bad(path, format!("word/document.xml: {e}")))?);
            }
            Xml::Empty(e) if e.name().as_ref() == b"w:tab" => paragraph.push('\t'),
            Xml::Empty(e) if e.name().as_ref() == b"w:br" => paragraph.push('\n'),
            Xml::End(e) if e.name().as_ref() == b"w:p" => {
                let p = std::mem::take(&mut paragraph);
                if !p.trim().is_empty() {
                    out.push(p.trim().to_owned());
                }
            }
            Xml::Eof => break,
            _ => {}
        }
    }
    Ok(out.join("\n\n"))
}

/// The paragraphs of a text: runs of lines separated by blank (or whitespace-only) lines,
/// trimmed, never empty.
fn paragraphs(text: &str) -> impl Iterator<Item = &str> {
    let mut parts = vec![];
    let (mut start, mut offset) = (0, 0);
    for line in text.split_inclusive('\n') {
        if line.trim().is_empty() {
            parts.push(&text[start..offset]);
            start = offset + line.len();
        }
        offset += line.len();
    }
    parts.push(&text[start..]);
    parts.into_iter().map(str::trim).filter(|p| !p.is_empty())
}

/// Splits a text into chunks of at most `max_bytes` bytes on paragraph boundaries:
/// consecutive paragraphs are packed into one chunk (joined by a blank line) while they fit.
/// A paragraph longer than `max_bytes` is split after the last sentence end (`. ! ?` and a
/// space) that fits, else at the last space, else at a character boundary. No chunk is
/// empty; the chunks hold every non-blank character of the text, in order.
pub fn chunk(text: &str, max_bytes: usize) -> Vec<String> {
    let max_bytes = max_bytes.max(16);
    let mut chunks = Vec::new();
    let mut current = String::new();
    for paragraph in paragraphs(text) {
        let mut rest = paragraph;
        while !rest.is_empty() {
            let sep = if current.is_empty() { 0 } else { 2 };
            if current.len() + sep + rest.len() <= max_bytes {
                if sep > 0 {
                    current.push_str("\n\n");
                }
                current.push_str(rest);
                break;
            }
            if !current.is_empty() {
                chunks.push(std::mem::take(&mut current));
                continue;
            }
            let cut = split_point(rest, max_bytes);
            chunks.push(rest[..cut].trim_end().to_owned());
            rest = rest[cut..].trim_start();
        }
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// Where to cut `text` (longer than `max`) so the head fits in `max` bytes.
fn split_point(text: &str, max: usize) -> usize {
    let mut limit = max.min(text.len());
    while !text.is_char_boundary(limit) {
        limit -= 1;
    }
    let head = &text[..limit];
    let sentence = head.match_indices(['.', '!', '?']).map(|(i, _)| i + 1).filter(|&i| text[i..].starts_with(char::is_whitespace)).last();
    match sentence.or_else(|| head.rfind(char::is_whitespace).filter(|&i| i > 0)) {
        Some(i) if i > 0 => i,
        // One unbroken run: cut at the last character boundary that fits (never 0: `max`
        // is at least 16 bytes and a character is at most 4).
        _ => limit,
    }
}

/// What a chunk becomes: its event and its position in the file.
#[derive(Clone, Debug)]
pub struct Chunk {
    pub index: usize,
    pub event: ContributionSubmitted,
}

/// The `contribution.submitted` events of a document's chunks, signed by `key`. The event
/// id is `c-<contribution id>-<contributor>`, so the same chunk sent again by the same key is
/// a duplicate; `source` is `<file name>#<chunk index>`.
pub fn contributions(
    key: &Keypair,
    deployment: &ledgerlake_lakehouse::Deployment,
    datanet: &DatanetId,
    file_name: &str,
    chunks: &[String],
    license: &str,
    now: DateTime<Utc>,
) -> Result<Vec<Chunk>, Error> {
    let contributor = key.address();
    let who = contributor.to_string().to_ascii_lowercase();
    chunks
        .iter()
        .enumerate()
        .map(|(index, content)| {
            if content.len() > MAX_CONTENT_BYTES {
                return Err(Error::BadRequest(format!("chunk {index} of {file_name} has {} bytes; at most {MAX_CONTENT_BYTES}", content.len())));
            }
            let digest = Sha256Hex::digest(content.as_bytes());
            let message = messages::contribution(datanet, &digest);
            let id = ContributionId::for_message(&message);
            let event_id = format!("c-{id}-{}", who.trim_start_matches("0x"));
            let mut event: ledgerlake_lakehouse::Event = ContributionSubmitted {
                    event_id: event_id.parse().map_err(|e| Error::BadRequest(format!("event id {event_id}: {e}")))?,
                    event_time: now,
                    contribution_id: Some(id),
                    datanet_id: datanet.clone(),
                    contributor,
                    content: content.clone(),
                    content_sha256: Some(digest),
                    license: license.to_owned(),
                    language: None,
                    source: Some(format!("{file_name}#{index}")),
                    tags: vec![],
                    signature: ledgerlake_lakehouse::Signature::placeholder(),
                }
                .into();
            key.sign_event(&mut event, deployment).map_err(Error::BadRequest)?;
            let ledgerlake_lakehouse::Event::ContributionSubmitted(event) = event else {
                unreachable!("signing keeps the kind")
            };
            Ok(Chunk { index, event })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_pack_paragraphs_and_keep_every_word() {
        let text = "First paragraph here.\n\nSecond one.\n  \nThird, a little longer than the others.\n\n\n\nFourth.";
        let chunks = chunk(text, 40);
        assert_eq!(chunks, vec!["First paragraph here.\n\nSecond one.", "Third, a little longer than the others.", "Fourth."]);
        let words = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(words(&chunks.join(" ")), words(text));
        assert!(chunks.iter().all(|c| c.len() <= 40 && !c.is_empty()));
    }

    #[test]
    fn a_long_paragraph_splits_at_sentences_then_spaces_then_characters() {
        let text = "One sentence here. Another sentence follows. And a third one ends it.";
        let chunks = chunk(text, 45);
        assert_eq!(chunks, vec!["One sentence here. Another sentence follows.", "And a third one ends it."]);
        let chunks = chunk("alpha beta gamma delta epsilon zeta eta theta", 20);
        assert_eq!(chunks, vec!["alpha beta gamma", "delta epsilon zeta", "eta theta"]);
        let long = "é".repeat(30); // 60 bytes, no spaces
        let chunks = chunk(&long, 17);
        assert!(chunks.iter().all(|c| c.len() <= 17 && c.chars().all(|ch| ch == 'é')));
        assert_eq!(chunks.concat(), long);
        assert!(chunk("  \n\n \n", 100).is_empty());
    }

    #[test]
    fn events_are_signed_and_their_ids_repeat() {
        let key = Keypair::from_seed(b"contributor");
        let d: DatanetId = "facts".parse().unwrap();
        let chunks = vec!["a".to_owned(), "b".to_owned()];
        let dep = ledgerlake_lakehouse::Deployment { id: ledgerlake_lakehouse::Bytes32::from_bytes([3; 32]), chain_id: None };
        let one = contributions(&key, &dep, &d, "notes.md", &chunks, "CC-BY-4.0", Utc::now()).unwrap();
        let two = contributions(&key, &dep, &d, "notes.md", &chunks, "CC-BY-4.0", Utc::now()).unwrap();
        assert_eq!(one.len(), 2);
        assert_eq!(one[1].event.source.as_deref(), Some("notes.md#1"));
        assert_eq!(one[0].event.event_id, two[0].event.event_id);
        let other = contributions(&Keypair::from_seed(b"someone else"), &dep, &d, "notes.md", &chunks, "CC-BY-4.0", Utc::now()).unwrap();
        assert_ne!(one[0].event.event_id, other[0].event.event_id);
        assert_eq!(one[0].event.contribution_id, other[0].event.contribution_id, "content-addressed");
        let event = ledgerlake_lakehouse::Event::from(one[0].event.clone());
        let event = crate::validate::check(0, event).unwrap();
        let reader = crate::Submitter::Key(crate::Principal { id: "k".into(), role: crate::Role::Read, address: None });
        crate::authority::admit(&event, &reader, &dep).unwrap();
    }

    #[test]
    fn unsupported_and_broken_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        for (name, bytes, says) in [
            ("a.odt", &b"x"[..], "unsupported file type"),
            ("b.pdf", b"%PDF-1.4 not really", "not a readable PDF"),
            ("c.docx", b"PK not a zip", "not a DOCX"),
            ("d.txt", b"\xff\xfe", "not UTF-8"),
        ] {
            let err = extract_text(&write(name, bytes)).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains(says), "{err}");
        }
    }

    /// A zip bomb (a small DOCX whose document expands past the cap) is refused without
    /// expanding it whole.
    #[test]
    fn a_docx_that_expands_past_the_cap_is_refused() {
        use std::io::Write;
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        zip.start_file("word/document.xml", options).unwrap();
        let chunk = vec![b' '; 1 << 20];
        for _ in 0..(MAX_DOCX_XML_BYTES >> 20) + 1 {
            zip.write_all(&chunk).unwrap();
        }
        let bytes = zip.finish().unwrap().into_inner();
        assert!(bytes.len() < MAX_DOCX_XML_BYTES / 100, "the bomb is small: {} bytes", bytes.len());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bomb.docx");
        std::fs::write(&path, &bytes).unwrap();
        let err = extract_text(&path).unwrap_err().to_string();
        assert!(err.contains("expands past"), "{err}");
    }
}
