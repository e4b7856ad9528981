//! Result formats, shared by the CLI and the HTTP API.

use std::io::Write;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::execution::SendableRecordBatchStream;
use futures::StreamExt;

use crate::{Error, Result};

/// How results are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A text table for people (materialises the result).
    Table,
    Csv,
    /// One JSON array of row objects.
    Json,
    /// One JSON object per line.
    Ndjson,
    Parquet,
    /// Arrow IPC stream.
    Arrow,
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Ok(match name {
            "table" => Self::Table,
            "csv" => Self::Csv,
            "json" => Self::Json,
            "ndjson" => Self::Ndjson,
            "parquet" => Self::Parquet,
            "arrow" => Self::Arrow,
            _ => return Err(format!("unknown format {name:?}: use table, csv, json, ndjson, parquet or arrow")),
        })
    }
}

impl Format {

    /// The media type of the format (HTTP `Content-Type`).
    pub fn media_type(self) -> &'static str {
        match self {
            Self::Table => "text/plain; charset=utf-8",
            Self::Csv => "text/csv",
            Self::Json => "application/json",
            Self::Ndjson => "application/x-ndjson",
            Self::Parquet => "application/vnd.apache.parquet",
            Self::Arrow => "application/vnd.apache.arrow.stream",
        }
    }
}

fn io(e: impl std::fmt::Display) -> Error {
    Error::Execution(format!("writing the result: {e}"))
}

/// Writes a whole result stream in `format`, batch by batch (only `Table` collects first).
/// Returns the number of rows written.
pub async fn write_stream<W: Write + Send>(format: Format, mut stream: SendableRecordBatchStream, out: W) -> Result<u64> {
    let schema = stream.schema();
    let mut writer = BatchWriter::new(format, &schema, out)?;
    let mut rows = 0u64;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        rows += batch.num_rows() as u64;
        writer.write(&batch)?;
    }
    writer.finish()?;
    Ok(rows)
}

/// Writes batches one at a time in a format.
pub enum BatchWriter<W: Write + Send> {
    Table(W, Vec<RecordBatch>),
    Csv(arrow::csv::Writer<W>),
    Json(arrow_json_writer::ArrayWriter<W>),
    Ndjson(arrow_json_writer::LineDelimitedWriter<W>),
    Parquet(parquet_writer::ArrowWriter<W>),
    Arrow(arrow::ipc::writer::StreamWriter<W>),
}

use arrow::json as arrow_json_writer;
use datafusion::parquet::arrow as parquet_writer;

impl<W: Write + Send> BatchWriter<W> {
    pub fn new(format: Format, schema: &SchemaRef, out: W) -> Result<Self> {
        Ok(match format {
            Format::Table => Self::Table(out, Vec::new()),
            Format::Csv => Self::Csv(arrow::csv::WriterBuilder::new().with_header(true).build(out)),
            Format::Json => Self::Json(arrow_json_writer::ArrayWriter::new(out)),
            Format::Ndjson => Self::Ndjson(arrow_json_writer::LineDelimitedWriter::new(out)),
            Format::Parquet => Self::Parquet(parquet_writer::ArrowWriter::try_new(out, schema.clone(), None).map_err(io)?),
            Format::Arrow => Self::Arrow(arrow::ipc::writer::StreamWriter::try_new(out, schema).map_err(io)?),
        })
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        match self {
            Self::Table(_, batches) => batches.push(batch.clone()),
            Self::Csv(w) => w.write(batch).map_err(io)?,
            Self::Json(w) => w.write(batch).map_err(io)?,
            Self::Ndjson(w) => w.write(batch).map_err(io)?,
            Self::Parquet(w) => w.write(batch).map_err(io)?,
            Self::Arrow(w) => w.write(batch).map_err(io)?,
        }
        Ok(())
    }

    pub fn finish(self) -> Result<()> {
        match self {
            Self::Table(mut out, batches) => {
                let table = arrow::util::pretty::pretty_format_batches(&batches).map_err(io)?;
                writeln!(out, "{table}").map_err(io)?;
                out.flush().map_err(io)?;
            }
            Self::Csv(w) => w.into_inner().flush().map_err(io)?,
            Self::Json(mut w) => w.finish().map_err(io)?,
            Self::Ndjson(mut w) => w.finish().map_err(io)?,
            Self::Parquet(w) => {
                w.close().map_err(io)?;
            }
            Self::Arrow(mut w) => w.finish().map_err(io)?,
        }
        Ok(())
    }
}
