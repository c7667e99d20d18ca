//! `geo.nearby`: which points lie within a radius of an origin, nearest
//! first: "drivers near this rider", "friends nearby".

use rmpv::Value;
use rt_proto::internal::WireError;

use crate::registry::{Call, MethodResult, bad_request};

const EARTH_RADIUS_KM: f64 = 6_371.008_8;
const MAX_POINTS: usize = 100_000;

/// `{origin: [lat, lon], points: [[lat, lon]], radius_km, limit?}` →
/// `{matches: [{index, distance_km}]}`, nearest first.
pub fn nearby(call: &mut Call) -> MethodResult {
    let origin = point(
        call.field("origin")?
            .ok_or_else(|| bad_request("origin is required"))?,
    )?;
    let radius = call
        .field("radius_km")?
        .and_then(number)
        .filter(|r| *r >= 0.0)
        .ok_or_else(|| bad_request("radius_km must be a non-negative number"))?;
    let limit = match call.field("limit")? {
        None => usize::MAX,
        Some(v) => v
            .as_u64()
            .map(|l| usize::try_from(l).unwrap_or(usize::MAX))
            .ok_or_else(|| bad_request("limit must be a non-negative integer"))?,
    };
    let Some(Value::Array(points)) = call.field("points")? else {
        return Err(bad_request("points must be an array of [lat, lon]"));
    };
    if points.len() > MAX_POINTS {
        return Err(bad_request(format!("at most {MAX_POINTS} points")));
    }
    let points = points.iter().map(point).collect::<Result<Vec<_>, _>>()?;
    let matches = within(origin, &points, radius, limit);
    Ok(Value::Map(vec![(
        Value::from("matches"),
        Value::Array(
            matches
                .into_iter()
                .map(|(index, distance)| {
                    Value::Map(vec![
                        (Value::from("index"), Value::from(index as u64)),
                        (Value::from("distance_km"), Value::F64(distance)),
                    ])
                })
                .collect(),
        ),
    )]))
}

/// Indices and distances of the points within `radius_km`, nearest first.
pub fn within(
    origin: (f64, f64),
    points: &[(f64, f64)],
    radius_km: f64,
    limit: usize,
) -> Vec<(usize, f64)> {
    let mut found: Vec<(usize, f64)> = points
        .iter()
        .enumerate()
        .map(|(i, p)| (i, haversine_km(origin, *p)))
        .filter(|(_, d)| *d <= radius_km)
        .collect();
    found.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    found.truncate(limit);
    found
}

/// Great-circle distance between two (lat, lon) points in degrees.
pub fn haversine_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (lat1, lon1) = (a.0.to_radians(), a.1.to_radians());
    let (lat2, lon2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((lat2 - lat1) / 2.0).sin().powi(2)
        + lat1.cos() * lat2.cos() * ((lon2 - lon1) / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Integer(i) => i.as_f64(),
        Value::F32(f) => Some(f64::from(*f)),
        Value::F64(f) if f.is_finite() => Some(*f),
        _ => None,
    }
}

fn point(v: &Value) -> Result<(f64, f64), WireError> {
    let pair = match v {
        Value::Array(pair) if pair.len() == 2 => pair,
        _ => return Err(bad_request("a point is [lat, lon]")),
    };
    let lat = number(&pair[0]).filter(|l| (-90.0..=90.0).contains(l));
    let lon = number(&pair[1]).filter(|l| (-180.0..=180.0).contains(l));
    match (lat, lon) {
        (Some(lat), Some(lon)) => Ok((lat, lon)),
        _ => Err(bad_request(
            "a point is [lat, lon] in degrees, lat in ±90, lon in ±180",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_distances() {
        let paris = (48.8566, 2.3522);
        let london = (51.5074, -0.1278);
        let d = haversine_km(paris, london);
        assert!((d - 343.5).abs() < 1.0, "{d}");
        assert_eq!(haversine_km(paris, paris), 0.0);
    }

    #[test]
    fn nearest_first_within_radius() {
        let origin = (0.0, 0.0);
        let points = [(0.0, 1.0), (0.0, 0.1), (0.0, 10.0), (0.0, 0.5)];
        let found = within(origin, &points, 200.0, usize::MAX);
        assert_eq!(
            found.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![1, 3, 0]
        );
        assert_eq!(within(origin, &points, 200.0, 1).len(), 1);
    }

    #[test]
    fn refuses_bad_points() {
        assert!(point(&Value::Array(vec![Value::from(91), Value::from(0)])).is_err());
        assert!(point(&Value::Array(vec![Value::from(0)])).is_err());
        assert!(point(&Value::from("x")).is_err());
    }
}
