//! PNG charts with `plotters` on its bitmap backend. Labels are drawn with a TrueType font
//! read from the Debian `fonts-dejavu-core` package (no fontconfig, no system font lookup),
//! registered once under the family name the charts use.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{BenchError, Result};

/// The family name the charts ask for; [`use_font`] registers it.
const FAMILY: &str = "sans-serif";

/// Where Debian's fonts-dejavu-core installs its sans face.
pub const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

const SIZE: (u32, u32) = (1000, 560);

/// One named series of points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Axis descriptions and scale of a line chart.
pub struct LineChart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub log_y: bool,
    /// Draw a marker at each point (few points) as well as the line.
    pub markers: bool,
    /// Break a series' line where consecutive points are further apart than this in x (a
    /// period with no samples, e.g. while a VM is down), instead of bridging the gap.
    pub max_gap: Option<f64>,
    /// Also break every line where it crosses this x (e.g. the failure at t = 0: the points
    /// before and after come from two different VMMs).
    pub break_at: Option<f64>,
}

/// Splits `points` (in x order) into runs with no x step larger than `max_gap` and none
/// crossing `break_at`.
fn split_at_gaps(
    points: &[(f64, f64)],
    max_gap: Option<f64>,
    break_at: Option<f64>,
) -> Vec<Vec<(f64, f64)>> {
    let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
    for &point in points {
        let continues = match runs.last().and_then(|run| run.last()) {
            Some(previous) => {
                max_gap.is_none_or(|gap| point.0 - previous.0 <= gap)
                    && break_at.is_none_or(|x| (previous.0 < x) == (point.0 < x))
            }
            None => false,
        };
        match runs.last_mut() {
            Some(run) if continues => run.push(point),
            _ => runs.push(vec![point]),
        }
    }
    runs
}

/// Registers the label font from `path` (once per process; later calls are no-ops).
pub fn use_font(path: &Path) -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            // plotters keeps registered fonts for the life of the process and needs 'static
            // bytes: leak the one font file on purpose.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font(FAMILY, FontStyle::Normal, bytes)
                .map_err(|_| format!("{}: not a usable TrueType font", path.display()))
        })
        .clone()
        .map_err(|detail| BenchError::Font { detail })
}

const PALETTE: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
];

/// Draws `series` as lines into a PNG at `path`.
pub fn line_chart(path: &Path, chart: &LineChart, series: &[Series]) -> Result<PathBuf> {
    draw_lines(path, chart, series).map_err(|detail| BenchError::Plot {
        path: path.to_path_buf(),
        detail,
    })?;
    Ok(path.to_path_buf())
}

fn bounds(series: &[Series], log_y: bool) -> Option<((f64, f64), (f64, f64))> {
    let points = series.iter().flat_map(|s| s.points.iter().copied());
    let points: Vec<(f64, f64)> = points
        .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_y || *y > 0.0))
        .collect();
    let x_min = points.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let x_max = points.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let y_min = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let y_max = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    if points.is_empty() {
        return None;
    }
    let x_pad = ((x_max - x_min) * 0.03).max(1e-9);
    let x = (x_min - x_pad, x_max + x_pad);
    let y = if log_y {
        (y_min / 2.0, y_max * 2.0)
    } else {
        (0.0_f64.min(y_min), y_max * 1.08 + 1e-9)
    };
    Some((x, y))
}

fn draw_lines(
    path: &Path,
    chart: &LineChart,
    series: &[Series],
) -> std::result::Result<(), String> {
    let ((x0, x1), (y0, y1)) =
        bounds(series, chart.log_y).ok_or_else(|| "no points to draw".to_string())?;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(chart.title, (FAMILY, 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(84);
    // The two scales are different types in plotters; the drawing code is shared below.
    macro_rules! draw_on {
        ($context:expr) => {{
            let mut context = $context.map_err(|e| e.to_string())?;
            context
                .configure_mesh()
                .x_desc(chart.x_label)
                .y_desc(chart.y_label)
                .label_style((FAMILY, 14))
                .draw()
                .map_err(|e| e.to_string())?;
            for (index, one) in series.iter().enumerate() {
                let color = PALETTE[index % PALETTE.len()];
                let points: Vec<(f64, f64)> = one
                    .points
                    .iter()
                    .copied()
                    .filter(|(_, y)| !chart.log_y || *y > 0.0)
                    .collect();
                for (run_index, run) in split_at_gaps(&points, chart.max_gap, chart.break_at)
                    .into_iter()
                    .enumerate()
                {
                    let drawn = context
                        .draw_series(LineSeries::new(run, color.stroke_width(2)))
                        .map_err(|e| e.to_string())?;
                    // One legend entry per series, not per unbroken run.
                    if run_index == 0 {
                        drawn.label(one.name.as_str()).legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(3))
                        });
                    }
                }
                if chart.markers {
                    context
                        .draw_series(
                            points
                                .iter()
                                .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
                        )
                        .map_err(|e| e.to_string())?;
                }
            }
            context
                .configure_series_labels()
                .label_font((FAMILY, 15))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(|e| e.to_string())?;
        }};
    }
    if chart.log_y {
        draw_on!(builder.build_cartesian_2d(x0..x1, (y0..y1).log_scale()));
    } else {
        draw_on!(builder.build_cartesian_2d(x0..x1, y0..y1));
    }
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

/// Draws one bar per `(label, value)` into a PNG at `path`.
pub fn bar_chart(
    path: &Path,
    title: &str,
    y_label: &str,
    bars: &[(String, f64)],
) -> Result<PathBuf> {
    draw_bars(path, title, y_label, bars).map_err(|detail| BenchError::Plot {
        path: path.to_path_buf(),
        detail,
    })?;
    Ok(path.to_path_buf())
}

fn draw_bars(
    path: &Path,
    title: &str,
    y_label: &str,
    bars: &[(String, f64)],
) -> std::result::Result<(), String> {
    if bars.is_empty() {
        return Err("no bars to draw".into());
    }
    let y_max = bars.iter().map(|b| b.1).fold(0.0, f64::max) * 1.15 + 1e-9;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    let mut context = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(84)
        .build_cartesian_2d(0.0..bars.len() as f64, 0.0..y_max)
        .map_err(|e| e.to_string())?;
    context
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len() * 2 + 1)
        .x_label_formatter(&|x| {
            // Label only the bar centres (x = i + 0.5).
            let index = x.floor() as usize;
            if (x - index as f64 - 0.5).abs() < 1e-6 {
                labels.get(index).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(y_label)
        .label_style((FAMILY, 14))
        .draw()
        .map_err(|e| e.to_string())?;
    context
        .draw_series(bars.iter().enumerate().map(|(index, (_, value))| {
            let color = PALETTE[index % PALETTE.len()];
            Rectangle::new(
                [(index as f64 + 0.2, 0.0), (index as f64 + 0.8, *value)],
                color.filled(),
            )
        }))
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_line_and_bar_charts_to_png() {
        use_font(Path::new(DEFAULT_FONT)).expect("install fonts-dejavu-core");
        let dir = tempfile::tempdir().unwrap();
        let lines = dir.path().join("lines.png");
        let series = [
            Series {
                name: "a".into(),
                points: vec![(0.0, 1.0), (1.0, 10.0), (2.0, 100.0)],
            },
            Series {
                name: "b".into(),
                points: vec![(0.0, 2.0), (2.0, 3.0)],
            },
        ];
        let chart = LineChart {
            title: "t",
            x_label: "x",
            y_label: "y",
            log_y: true,
            markers: true,
            max_gap: Some(1.5),
            break_at: None,
        };
        line_chart(&lines, &chart, &series).unwrap();
        let bars = dir.path().join("bars.png");
        bar_chart(&bars, "t", "y", &[("one".into(), 1.0), ("two".into(), 2.0)]).unwrap();
        for path in [lines, bars] {
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(&bytes[1..4], b"PNG", "{}", path.display());
        }
    }

    #[test]
    fn lines_break_only_at_gaps() {
        let points = [(0.0, 1.0), (0.1, 1.0), (0.2, 1.0), (2.0, 1.0), (2.1, 1.0)];
        let runs = split_at_gaps(&points, Some(0.5), None);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].len(), 3);
        assert_eq!(split_at_gaps(&points, None, None).len(), 1);
        assert!(split_at_gaps(&[], Some(0.5), None).is_empty());
        let around_zero = [(-0.1, 1.0), (-0.05, 1.0), (0.02, 1.0), (0.07, 1.0)];
        let runs = split_at_gaps(&around_zero, Some(0.5), Some(0.0));
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[1], [(0.02, 1.0), (0.07, 1.0)]);
    }

    #[test]
    fn nothing_to_draw_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let chart = LineChart {
            title: "t",
            x_label: "x",
            y_label: "y",
            log_y: false,
            markers: false,
            max_gap: None,
            break_at: None,
        };
        assert!(line_chart(&dir.path().join("x.png"), &chart, &[]).is_err());
        assert!(bar_chart(&dir.path().join("y.png"), "t", "y", &[]).is_err());
    }
}
