//! Functions whose output size a caller chooses (`repeat(s, n)`, `lpad(s, n)`,
//! `rpad(s, n)`, `array_repeat(x, n)`, `array_resize(l, n)`, `range(a, b, step)` and `generate_series` as a
//! scalar), bounded. Their results are built outside the query's memory pool, so
//! `SELECT repeat('x', 20000000000)` would allocate 20 GB before any limit saw it. Each
//! is DataFusion's own function behind a check: the bytes one call may build, summed
//! over the rows of its batch, are at most the query's memory limit; more is refused as
//! the memory limit (`Error::MemoryLimit`) before anything is allocated.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::compute::kernels::length::length;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type};
use datafusion::common::{DataFusionError, Result};
use datafusion::logical_expr::{ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature};
use datafusion::execution::FunctionRegistry;
use datafusion::prelude::SessionContext;

/// How a function's output size follows from its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Growth {
    /// `repeat(s, n)`: `len(s) · n` bytes.
    Repeat,
    /// `lpad(s, n, ...)`, `rpad(s, n, ...)`: `n` characters, at most 4 bytes each.
    Pad,
    /// `array_repeat(x, n)`: `n` copies of `x` (at least 8 bytes each).
    Items,
    /// `array_resize(list, n[, value])`: `n` items (8 bytes each, at least).
    Resize,
    /// `range(stop)`, `range(start, stop[, step])`: `(stop - start) / step` integers of 8
    /// bytes (integer arguments; date ranges are not checked).
    Range,
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Bounded {
    inner: Arc<ScalarUDF>,
    growth: Growth,
    limit: u64,
}

/// Replaces `repeat`, `lpad` and `rpad` of `ctx` (those it has) with bounded ones.
pub fn register(ctx: &SessionContext, limit_bytes: usize) {
    let functions = [
        ("repeat", Growth::Repeat),
        ("lpad", Growth::Pad),
        ("rpad", Growth::Pad),
        ("array_repeat", Growth::Items),
        ("array_resize", Growth::Resize),
        ("range", Growth::Range),
        ("generate_series", Growth::Range),
    ];
    for (name, growth) in functions {
        if let Ok(inner) = ctx.udf(name) {
            ctx.register_udf(ScalarUDF::new_from_impl(Bounded { inner, growth, limit: limit_bytes as u64 }));
        }
    }
}

/// Argument `i`: one value per row, or one value for every row (a scalar, not expanded:
/// measuring must not build what it measures).
fn arg(args: &[ColumnarValue], i: usize) -> Result<Option<ArrayRef>> {
    Ok(match args.get(i) {
        None => None,
        Some(ColumnarValue::Array(a)) => Some(a.clone()),
        Some(ColumnarValue::Scalar(s)) => Some(s.to_array_of_size(1)?),
    })
}

/// Row `r` of per-row values, or the one value of a scalar.
fn at(values: &[u64], r: usize) -> u64 {
    match values.len() {
        1 => values[0],
        _ => values.get(r).copied().unwrap_or(0),
    }
}

/// `f` summed over the rows (saturating).
fn over_rows(rows: usize, f: impl Fn(usize) -> u64) -> u64 {
    (0..rows).fold(0u64, |acc, r| acc.saturating_add(f(r)))
}

/// The non-negative integers of `array` (nulls and negatives as 0).
fn counts(array: &ArrayRef) -> Result<Vec<u64>> {
    let ints = cast(array, &DataType::Int64)?;
    let ints = ints.as_primitive::<Int64Type>();
    Ok((0..ints.len()).map(|i| if ints.is_null(i) { 0 } else { ints.value(i).max(0) as u64 }).collect())
}

impl Bounded {
    /// The most bytes this call builds, over all its rows (saturating).
    fn output_bytes(&self, args: &ScalarFunctionArgs) -> Result<u64> {
        let rows = args.number_rows.max(1);
        // The bytes each unit of the count argument builds (per row, or one for all rows).
        let unit: Vec<u64> = match self.growth {
            Growth::Range => return range_bytes(&args.args, rows),
            Growth::Pad => vec![4],
            Growth::Resize => vec![8],
            Growth::Items => vec![arg(&args.args, 0)?.map_or(8, |x| (x.get_array_memory_size() / x.len().max(1)).max(8) as u64)],
            Growth::Repeat => {
                let Some(s) = arg(&args.args, 0)? else { return Ok(0) };
                let s = if matches!(s.data_type(), DataType::Utf8View | DataType::BinaryView) { cast(&s, &DataType::LargeUtf8)? } else { s };
                counts(&length(&s)?)?
            }
        };
        let Some(n) = arg(&args.args, 1)? else { return Ok(0) };
        let n = counts(&n)?;
        Ok(over_rows(rows, |r| at(&unit, r).saturating_mul(at(&n, r))))
    }
}

/// The bytes of the integer lists `range`/`generate_series` build over `rows` rows; 0 for
/// arguments that are not integers (dates, timestamps).
fn range_bytes(args: &[ColumnarValue], rows: usize) -> Result<u64> {
    let ints = |i: usize| -> Result<Option<Vec<Option<i64>>>> {
        let Some(a) = arg(args, i)? else { return Ok(None) };
        if !a.data_type().is_integer() {
            return Ok(None);
        }
        let a = cast(&a, &DataType::Int64)?;
        let a = a.as_primitive::<Int64Type>();
        Ok(Some((0..a.len()).map(|i| (!a.is_null(i)).then(|| a.value(i))).collect()))
    };
    let (start, stop, step) = match args.len() {
        1 => (None, ints(0)?, None),
        2 => (ints(0)?, ints(1)?, None),
        _ => (ints(0)?, ints(1)?, ints(2)?),
    };
    let Some(stop) = stop else { return Ok(0) };
    if (args.len() >= 2 && start.is_none()) || (args.len() >= 3 && step.is_none()) {
        return Ok(0);
    }
    let pick = |v: &[Option<i64>], r: usize| if v.len() == 1 { v[0] } else { v.get(r).copied().flatten() };
    Ok(over_rows(rows, |r| {
        let begin = start.as_ref().map_or(Some(0), |s| pick(s, r));
        let step = step.as_ref().map_or(Some(1), |s| pick(s, r));
        let (Some(begin), Some(stop), Some(step)) = (begin, pick(&stop, r), step) else { return 0 };
        if step == 0 {
            return 0;
        }
        let span = (i128::from(stop) - i128::from(begin)).unsigned_abs();
        let items = span / i128::from(step).unsigned_abs() + 1;
        u64::try_from(items.saturating_mul(8)).unwrap_or(u64::MAX)
    }))
}

impl ScalarUDFImpl for Bounded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<datafusion::arrow::datatypes::FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let bytes = self.output_bytes(&args)?;
        if bytes > self.limit {
            return Err(DataFusionError::ResourcesExhausted(format!(
                "{}() would build {bytes} bytes in one batch, more than the query's memory limit of {} bytes",
                self.name(),
                self.limit
            )));
        }
        self.inner.invoke_with_args(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(ctx: &SessionContext, sql: &str) -> Result<Vec<datafusion::arrow::array::RecordBatch>> {
        ctx.sql(sql).await?.collect().await
    }

    /// A huge count is refused before anything is built, in a literal and over a column;
    /// ordinary calls answer as DataFusion's own functions do.
    #[tokio::test]
    async fn huge_outputs_are_refused_and_small_ones_answer() {
        let ctx = SessionContext::new();
        register(&ctx, 1 << 20);
        for sql in [
            "SELECT repeat('x', 20000000000)",
            "SELECT lpad('x', 20000000000)",
            "SELECT rpad('x', 20000000000, 'y')",
            "SELECT repeat(s, n) FROM (VALUES ('ab', 1), ('cd', 600000)) AS t(s, n)",
            "SELECT array_repeat(1, 20000000000)",
            "SELECT array_resize([1], 20000000000)",
            "SELECT range(1, 20000000000)",
            "SELECT range(0, 9000000000000000000, 3)",
            "SELECT generate_series(-9223372036854775807, 9223372036854775807)",
        ] {
            let e = run(&ctx, sql).await.unwrap_err();
            assert!(matches!(e.find_root(), DataFusionError::ResourcesExhausted(_)), "{sql}: {e}");
        }
        let out = run(&ctx, "SELECT repeat('ab', 3) AS r, lpad('7', 3, '0') AS l, rpad('7', 3, '.') AS p, repeat(NULL, 2) AS z").await.unwrap();
        let lists = run(&ctx, "SELECT cardinality(array_repeat(7, 5)) AS a, cardinality(range(1, 10, 2)) AS b, cardinality(range(4)) AS c").await.unwrap();
        let ints = |c: usize| cast(lists[0].column(c), &DataType::Int64).unwrap().as_primitive::<Int64Type>().value(0);
        assert_eq!((ints(0), ints(1), ints(2)), (5, 5, 4));
        let strings = |c: usize| {
            let col = cast(out[0].column(c), &DataType::Utf8).unwrap();
            let col = col.as_string::<i32>();
            (0..col.len()).map(|i| (!col.is_null(i)).then(|| col.value(i).to_owned())).collect::<Vec<_>>()
        };
        assert_eq!(strings(0), vec![Some("ababab".to_owned())]);
        assert_eq!(strings(1), vec![Some("007".to_owned())]);
        assert_eq!(strings(2), vec![Some("7..".to_owned())]);
        assert_eq!(strings(3), vec![None]);
        // A constant argument is measured, not expanded to every row.
        let e = run(&ctx, "SELECT repeat(repeat('x', 1000), 2000) FROM generate_series(1, 8192)").await.unwrap_err();
        assert!(matches!(e.find_root(), DataFusionError::ResourcesExhausted(_)), "{e}");
        // Within the limit over many rows: 1,000 rows of 100 bytes.
        let ok = run(&ctx, "SELECT repeat('x', 100) FROM (SELECT * FROM generate_series(1, 1000))").await.unwrap();
        assert_eq!(ok.iter().map(|b| b.num_rows()).sum::<usize>(), 1000);
    }
}
