//! `stats.summarize`: summary statistics of a list of numbers (a dashboard's
//! "p99 of these latencies"), streaming running figures after each chunk so a
//! client sees progress on big inputs.

use rmpv::Value;
use rt_proto::ErrorCode;
use rt_proto::internal::WireError;

use crate::registry::{Call, MethodResult, bad_request};

const DEFAULT_CHUNK: usize = 10_000;

/// Running figures over what was seen so far.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Running {
    pub count: usize,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

impl Running {
    fn new() -> Self {
        Self {
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }

    fn add(&mut self, x: f64) {
        self.count += 1;
        self.sum += x;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
    }

    fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }

    fn to_value(self) -> Vec<(Value, Value)> {
        vec![
            (Value::from("count"), Value::from(self.count as u64)),
            (Value::from("mean"), Value::F64(self.mean())),
            (
                Value::from("min"),
                Value::F64(if self.count == 0 { 0.0 } else { self.min }),
            ),
            (
                Value::from("max"),
                Value::F64(if self.count == 0 { 0.0 } else { self.max }),
            ),
        ]
    }
}

/// `{values: [number], chunk?}` → parts `{processed, count, mean, min, max}`,
/// then `{count, mean, min, max, stddev, p50, p90, p99}`.
pub fn summarize(call: &mut Call, max_values: usize) -> MethodResult {
    let values = numbers(call.field("values")?, max_values)?;
    let chunk = match call.field("chunk")? {
        None => DEFAULT_CHUNK,
        Some(v) => v
            .as_u64()
            .filter(|c| *c > 0)
            .map(|c| usize::try_from(c).unwrap_or(usize::MAX))
            .ok_or_else(|| bad_request("chunk must be a positive integer"))?,
    };
    let mut running = Running::new();
    for piece in values.chunks(chunk) {
        if call.is_cancelled() {
            return Err(WireError::new(ErrorCode::TIMEOUT, "the caller went away"));
        }
        piece.iter().for_each(|x| running.add(*x));
        if running.count < values.len() {
            let mut part = vec![(Value::from("processed"), Value::from(running.count as u64))];
            part.extend(running.to_value());
            call.send_part(&Value::Map(part))?;
        }
    }
    Ok(Value::Map(final_summary(&values, running)))
}

fn final_summary(values: &[f64], running: Running) -> Vec<(Value, Value)> {
    let mean = running.mean();
    let variance = if values.is_empty() {
        0.0
    } else {
        values.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / values.len() as f64
    };
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mut out = running.to_value();
    out.push((Value::from("stddev"), Value::F64(variance.sqrt())));
    for (name, q) in [("p50", 0.50), ("p90", 0.90), ("p99", 0.99)] {
        out.push((Value::from(name), Value::F64(percentile(&sorted, q))));
    }
    out
}

/// Nearest-rank percentile of sorted values (0 for none).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn numbers(value: Option<&Value>, max: usize) -> Result<Vec<f64>, WireError> {
    let Some(Value::Array(items)) = value else {
        return Err(bad_request("values must be an array of numbers"));
    };
    if items.len() > max {
        return Err(WireError::new(
            ErrorCode::LIMIT_EXCEEDED,
            format!("at most {max} values per call"),
        ));
    }
    items
        .iter()
        .map(|v| match v {
            Value::Integer(i) => i
                .as_f64()
                .ok_or_else(|| bad_request("values must be numbers")),
            Value::F32(f) => Ok(f64::from(*f)),
            Value::F64(f) if f.is_finite() => Ok(*f),
            _ => Err(bad_request("values must be finite numbers")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 0.5), 50.0);
        assert_eq!(percentile(&sorted, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.9), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn summary_figures() {
        let values = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0];
        let mut running = Running::new();
        values.iter().for_each(|x| running.add(*x));
        let summary = final_summary(&values, running);
        let get = |k: &str| {
            summary
                .iter()
                .find(|(key, _)| key.as_str() == Some(k))
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("mean"), Some(Value::F64(5.0)));
        assert_eq!(get("stddev"), Some(Value::F64(2.0)));
        assert_eq!(get("min"), Some(Value::F64(2.0)));
        assert_eq!(get("max"), Some(Value::F64(9.0)));
        assert_eq!(get("count"), Some(Value::from(8u64)));
    }

    #[test]
    fn refuses_non_numbers_and_too_many() {
        let bad = Value::Array(vec![Value::from("x")]);
        assert!(numbers(Some(&bad), 10).is_err());
        let nan = Value::Array(vec![Value::F64(f64::NAN)]);
        assert!(numbers(Some(&nan), 10).is_err());
        let many = Value::Array(vec![Value::from(1); 11]);
        assert_eq!(
            numbers(Some(&many), 10).map_err(|e| e.code),
            Err(ErrorCode::LIMIT_EXCEEDED)
        );
    }
}
