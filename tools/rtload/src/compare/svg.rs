//! Hand-written SVG plots for `rtload report`: line plots (linear or log axes) and a
//! horizontal bar chart of ratios. No dependencies: the output is plain SVG 1.1 text.

use std::fmt::Write as _;

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;

/// One line of a line plot.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub dashed: bool,
    /// (x, y), drawn in x order; points with a non-positive coordinate on a log axis are
    /// left out.
    pub points: Vec<(f64, f64)>,
}

/// A line plot's frame.
#[derive(Debug, Clone)]
pub struct Plot<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub log_x: bool,
    pub log_y: bool,
    /// A dotted horizontal line (value, label), e.g. a latency limit.
    pub hline: Option<(f64, &'a str)>,
}

/// Colours of the two systems.
pub const OURS: &str = "#1f77b4";
pub const NODE: &str = "#d62728";

/// Text safe inside an element or an attribute.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A number as a short tick label: 1, 2.5, 10k, 0.05.
pub fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 && (v / 1e6).fract() == 0.0 {
        format!("{}M", v / 1e6)
    } else if a >= 1e3 && (v / 1e3).fract() == 0.0 {
        format!("{}k", v / 1e3)
    } else if a >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        trim(format!("{v:.2}"))
    } else {
        trim(format!("{v:.4}"))
    }
}

fn trim(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// An axis: maps values to [0, 1] and proposes ticks.
#[derive(Debug, Clone, Copy)]
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Axis {
    fn new(values: impl Iterator<Item = f64>, log: bool, from_zero: bool) -> Self {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if !lo.is_finite() {
            (lo, hi) = if log { (1.0, 10.0) } else { (0.0, 1.0) };
        }
        if log {
            // Whole decades around the data.
            lo = 10f64.powi(lo.log10().floor() as i32);
            hi = 10f64.powi(hi.log10().ceil() as i32);
            if hi <= lo {
                hi = lo * 10.0;
            }
        } else {
            if from_zero {
                lo = lo.min(0.0);
            }
            if hi <= lo {
                hi = lo + 1.0;
            }
            let step = nice_step((hi - lo) / 5.0);
            lo = (lo / step).floor() * step;
            hi = (hi / step).ceil() * step;
        }
        Axis { lo, hi, log }
    }

    fn frac(&self, v: f64) -> f64 {
        if self.log {
            (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        }
    }

    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let decades = (self.hi.log10() - self.lo.log10()).round() as i32;
            let steps: &[f64] = if decades <= 2 {
                &[1.0, 2.0, 5.0]
            } else {
                &[1.0]
            };
            let mut out = Vec::new();
            let mut d = self.lo;
            while d <= self.hi * 1.0001 {
                for s in steps {
                    let v = d * s;
                    if v <= self.hi * 1.0001 {
                        out.push(v);
                    }
                }
                d *= 10.0;
            }
            out
        } else {
            let step = nice_step((self.hi - self.lo) / 5.0);
            let n = ((self.hi - self.lo) / step).round() as i64;
            (0..=n).map(|i| self.lo + i as f64 * step).collect()
        }
    }

    fn usable(&self, v: f64) -> bool {
        v.is_finite() && (!self.log || v > 0.0)
    }
}

/// 1, 2 or 5 × a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// The document's opening: an SVG `height` pixels tall on a white
/// background, with `title` centred at `title_y`.
fn header(out: &mut String, title: &str, height: f64, title_y: u32) {
    let _ = write!(
        out,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         viewBox=\"0 0 {WIDTH} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect x=\"0\" y=\"0\" width=\"{WIDTH}\" height=\"{height}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"{title_y}\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
        WIDTH / 2.0,
        escape(title)
    );
}

/// A line plot with a legend on the right.
pub fn line_plot(plot: &Plot<'_>, series: &[Series]) -> String {
    let xs = Axis::new(
        series.iter().flat_map(|s| s.points.iter().map(|p| p.0)),
        plot.log_x,
        false,
    );
    let ys = Axis::new(
        series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .chain(plot.hline.map(|h| h.0)),
        plot.log_y,
        true,
    );
    let (pw, ph) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let px = |v: f64| LEFT + xs.frac(v) * pw;
    let py = |v: f64| TOP + (1.0 - ys.frac(v)) * ph;
    let mut out = String::new();
    header(&mut out, plot.title, HEIGHT, 28);
    // Grid and ticks.
    out.push_str("<g class=\"grid\" stroke=\"#dddddd\" stroke-width=\"1\">\n");
    for t in ys.ticks() {
        let y = py(t);
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\"/>",
            LEFT + pw
        );
    }
    for t in xs.ticks() {
        let x = px(t);
        let _ = writeln!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{TOP:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\"/>",
            TOP + ph
        );
    }
    out.push_str("</g>\n<g class=\"ticks\" fill=\"#333333\">\n");
    for t in ys.ticks() {
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT - 6.0,
            py(t) + 4.0,
            escape(&tick_label(t))
        );
    }
    for t in xs.ticks() {
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            px(t),
            TOP + ph + 18.0,
            escape(&tick_label(t))
        );
    }
    out.push_str("</g>\n");
    let _ = writeln!(
        out,
        "<rect x=\"{LEFT:.1}\" y=\"{TOP:.1}\" width=\"{pw:.1}\" height=\"{ph:.1}\" fill=\"none\" stroke=\"#333333\"/>"
    );
    let _ = writeln!(
        out,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}{}</text>",
        LEFT + pw / 2.0,
        HEIGHT - 18.0,
        escape(plot.x_label),
        if plot.log_x { " (log scale)" } else { "" }
    );
    let _ = writeln!(
        out,
        "<text x=\"18\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {:.1})\">{}{}</text>",
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        escape(plot.y_label),
        if plot.log_y { " (log scale)" } else { "" }
    );
    if let Some((v, label)) = plot.hline.filter(|h| ys.usable(h.0)) {
        let y = py(v);
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#555555\" stroke-dasharray=\"2,3\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#555555\">{}</text>",
            LEFT + pw,
            LEFT + pw - 4.0,
            y - 4.0,
            escape(label)
        );
    }
    // Series and legend.
    for (i, s) in series.iter().enumerate() {
        let mut pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(x, y)| xs.usable(*x) && ys.usable(*y))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let dash = if s.dashed {
            " stroke-dasharray=\"6,4\""
        } else {
            ""
        };
        if pts.len() > 1 {
            let path: Vec<String> = pts
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
                .collect();
            let _ = writeln!(
                out,
                "<polyline class=\"series\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{dash} points=\"{}\"/>",
                s.color,
                path.join(" ")
            );
        }
        for (x, y) in &pts {
            let _ = writeln!(
                out,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{}\"><title>{}: {} → {}</title></circle>",
                px(*x),
                py(*y),
                s.color,
                escape(&s.name),
                tick_label(*x),
                tick_label((*y * 1000.0).round() / 1000.0)
            );
        }
        let ly = TOP + 10.0 + i as f64 * 22.0;
        let lx = LEFT + pw + 16.0;
        let _ = writeln!(
            out,
            "<line x1=\"{lx:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{}\" stroke-width=\"2\"{dash}/>\n\
             <text class=\"legend\" x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            lx + 28.0,
            s.color,
            lx + 34.0,
            ly + 4.0,
            escape(&s.name)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// One bar: how many times better ours is (`factor` > 1: ours better, < 1: Node better).
#[derive(Debug, Clone)]
pub struct Bar {
    pub label: String,
    pub factor: f64,
}

/// Horizontal bars on a log axis centred on 1 (parity).
pub fn ratio_bars(title: &str, bars: &[Bar]) -> String {
    let bars: Vec<&Bar> = bars
        .iter()
        .filter(|b| b.factor.is_finite() && b.factor > 0.0)
        .collect();
    let row = 24.0;
    let (left, right, top) = (300.0, 70.0, 60.0);
    let height = top + row * bars.len().max(1) as f64 + 60.0;
    let pw = WIDTH - left - right;
    let extreme = bars
        .iter()
        .map(|b| b.factor.log10().abs())
        .fold(0.0f64, f64::max)
        .max(1f64.log10() + 0.3)
        .ceil()
        .max(1.0);
    let px = |f: f64| left + (f.log10() / extreme + 1.0) / 2.0 * pw;
    let mut out = String::new();
    header(&mut out, title, height, 24);
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"44\" text-anchor=\"middle\" fill=\"#555555\">right of 1: ours better by that factor; left: Node better (log scale)</text>",
        WIDTH / 2.0
    );
    let bottom = top + row * bars.len().max(1) as f64;
    let e = extreme as i32;
    for k in -e..=e {
        let f = 10f64.powi(k);
        let x = px(f);
        let _ = writeln!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{top:.1}\" x2=\"{x:.1}\" y2=\"{bottom:.1}\" stroke=\"{}\"/>\n\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">×{}</text>",
            if k == 0 { "#333333" } else { "#dddddd" },
            bottom + 16.0,
            tick_label(f)
        );
    }
    for (i, b) in bars.iter().enumerate() {
        let y = top + i as f64 * row + 4.0;
        let (x0, x1) = (px(1.0), px(b.factor));
        let (x, w) = if x1 >= x0 {
            (x0, x1 - x0)
        } else {
            (x1, x0 - x1)
        };
        let color = if b.factor >= 1.0 { OURS } else { NODE };
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n\
             <rect class=\"bar\" x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"><title>{}</title></rect>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"{}\" fill=\"#333333\">×{}</text>",
            left - 8.0,
            y + 12.0,
            escape(&b.label),
            w.max(1.0),
            row - 8.0,
            escape(&b.label),
            if x1 >= x0 { x1 + 4.0 } else { x1 - 4.0 },
            y + 12.0,
            if x1 >= x0 { "start" } else { "end" },
            tick_label((b.factor * 100.0).round() / 100.0)
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A minimal XML well-formedness check: every element closed in order, attributes
    /// quoted, only the five predefined entities, one root.
    pub fn check_xml(text: &str) -> Result<Vec<String>, String> {
        let mut stack: Vec<String> = Vec::new();
        let mut seen = Vec::new();
        let mut roots = 0;
        let mut rest = text;
        while let Some(lt) = rest.find('<') {
            check_text(&rest[..lt])?;
            rest = &rest[lt..];
            let gt = rest.find('>').ok_or("unterminated tag")?;
            let tag = &rest[1..gt];
            rest = &rest[gt + 1..];
            if let Some(pi) = tag.strip_prefix('?') {
                if !pi.ends_with('?') {
                    return Err(format!("bad processing instruction <{tag}>"));
                }
            } else if let Some(name) = tag.strip_prefix('/') {
                let open = stack.pop().ok_or(format!("</{name}> closes nothing"))?;
                if open != name.trim() {
                    return Err(format!("</{name}> closes <{open}>"));
                }
            } else {
                let self_closing = tag.ends_with('/');
                let body = tag.trim_end_matches('/');
                let name: String = body.chars().take_while(|c| !c.is_whitespace()).collect();
                if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '-') {
                    return Err(format!("bad element name in <{tag}>"));
                }
                check_attrs(&body[name.len()..])?;
                if stack.is_empty() {
                    roots += 1;
                }
                seen.push(name.clone());
                if !self_closing {
                    stack.push(name);
                }
            }
        }
        check_text(rest)?;
        if !stack.is_empty() {
            return Err(format!("unclosed: {stack:?}"));
        }
        if roots != 1 {
            return Err(format!("{roots} root elements"));
        }
        Ok(seen)
    }

    fn check_text(text: &str) -> Result<(), String> {
        let mut rest = text;
        while let Some(amp) = rest.find('&') {
            rest = &rest[amp..];
            let semi = rest.find(';').ok_or("bare &")?;
            if !["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"].contains(&&rest[..=semi]) {
                return Err(format!("unknown entity {}", &rest[..=semi]));
            }
            rest = &rest[semi + 1..];
        }
        if text.contains('>') {
            return Err("bare > in text".into());
        }
        Ok(())
    }

    fn check_attrs(mut attrs: &str) -> Result<(), String> {
        loop {
            attrs = attrs.trim_start();
            if attrs.is_empty() {
                return Ok(());
            }
            let eq = attrs
                .find('=')
                .ok_or(format!("attribute without value: {attrs}"))?;
            let name = &attrs[..eq];
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(format!("bad attribute name `{name}`"));
            }
            let value = attrs[eq + 1..]
                .strip_prefix('"')
                .ok_or(format!("unquoted attribute {name}"))?;
            let end = value.find('"').ok_or("unterminated attribute")?;
            if value[..end].contains('<') {
                return Err(format!("< in attribute {name}"));
            }
            check_text(&value[..end])?;
            attrs = &value[end + 1..];
        }
    }

    #[test]
    fn the_checker_catches_mistakes() {
        assert!(check_xml("<svg><g></g></svg>").is_ok());
        assert!(check_xml("<svg><g></svg>").is_err());
        assert!(check_xml("<svg a=1/>").is_err());
        assert!(check_xml("<svg>a & b</svg>").is_err());
        assert!(check_xml("<svg/><svg/>").is_err());
    }

    #[test]
    fn line_plots_are_well_formed_svg() {
        let series = vec![
            Series {
                name: "ours p99 <fast> & \"good\"".into(),
                color: OURS,
                dashed: true,
                points: vec![(200.0, 1.5), (1000.0, 2.0), (5000.0, 40.0)],
            },
            Series {
                name: "Node p99".into(),
                color: NODE,
                dashed: false,
                points: vec![(1000.0, 3.0), (200.0, 0.0), (5000.0, 900.0)],
            },
        ];
        let plot = Plot {
            title: "fan-out latency",
            x_label: "offered publications/s",
            y_label: "ms",
            log_x: true,
            log_y: true,
            hline: Some((50.0, "50 ms")),
        };
        let svg = line_plot(&plot, &series);
        let elements = check_xml(&svg).unwrap_or_else(|e| panic!("{e}\n{svg}"));
        assert_eq!(elements[0], "svg");
        assert_eq!(svg.matches("<polyline").count(), 2);
        // The zero on the log axis is left out: 3 + 2 points.
        assert_eq!(svg.matches("<circle").count(), 5);
        assert!(svg.contains("&lt;fast&gt; &amp; &quot;good&quot;"));
        assert!(svg.contains(">1k<") && svg.contains(">100<"), "{svg}");
        // Linear axes from zero, and an empty plot still renders.
        let linear = Plot {
            log_x: false,
            log_y: false,
            hline: None,
            ..plot.clone()
        };
        check_xml(&line_plot(&linear, &series)).unwrap();
        check_xml(&line_plot(&linear, &[])).unwrap();
    }

    #[test]
    fn ratio_bars_are_well_formed_and_point_the_right_way() {
        let bars = vec![
            Bar {
                label: "fanout p99".into(),
                factor: 3.0,
            },
            Bar {
                label: "idle KiB/conn".into(),
                factor: 0.5,
            },
            Bar {
                label: "broken".into(),
                factor: f64::NAN,
            },
        ];
        let svg = ratio_bars("ours vs Node", &bars);
        let elements = check_xml(&svg).unwrap_or_else(|e| panic!("{e}\n{svg}"));
        assert_eq!(elements.iter().filter(|e| *e == "rect").count(), 3);
        assert!(svg.contains(&format!("fill=\"{OURS}\"><title>fanout p99")));
        assert!(svg.contains(&format!("fill=\"{NODE}\"><title>idle KiB/conn")));
        assert!(svg.contains(">×3<") && svg.contains(">×0.5<"), "{svg}");
        check_xml(&ratio_bars("empty", &[])).unwrap();
    }

    #[test]
    fn ticks_and_labels() {
        assert_eq!(tick_label(1000.0), "1k");
        assert_eq!(tick_label(2500.0), "2500");
        assert_eq!(tick_label(0.05), "0.05");
        assert_eq!(tick_label(1.5), "1.5");
        assert_eq!(nice_step(0.7), 1.0);
        assert_eq!(nice_step(13.0), 20.0);
        let log = Axis::new([0.8, 120.0].into_iter(), true, false);
        assert_eq!((log.lo, log.hi), (0.1, 1000.0));
        assert_eq!(log.ticks(), vec![0.1, 1.0, 10.0, 100.0, 1000.0]);
        let lin = Axis::new([3.0, 47.0].into_iter(), false, true);
        assert_eq!((lin.lo, lin.hi), (0.0, 50.0));
    }
}
