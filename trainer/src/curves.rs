//! `RUN/curves.svg`: the training loss and the test Recall@1 by epoch, beside the pretrained
//! baseline, so a user sees at a glance whether (and how fast) the metric learned.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};

/// One evaluated epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub epoch: f64,
    /// Mean training loss of the epoch (absent for the pretrained baseline at epoch 0).
    pub loss: Option<f64>,
    pub recall_at_1: f64,
}

/// The points of a run's `metrics.jsonl` lines (training lines carry `loss`; the baseline
/// line has `"model": "pretrained"` and epoch 0). Returns (baseline R@1, epochs).
pub fn points(lines: &[serde_json::Value]) -> (Option<f64>, Vec<Point>) {
    let mut baseline = None;
    let mut out = Vec::new();
    for l in lines {
        let (Some(epoch), Some(r1)) = (
            l.get("epoch").and_then(|v| v.as_f64()),
            l.get("recall@1").and_then(|v| v.as_f64()),
        ) else {
            continue;
        };
        if l.get("model").and_then(|v| v.as_str()) == Some("pretrained") {
            baseline = Some(r1);
            continue;
        }
        let loss = l.get("loss").and_then(|v| v.as_f64());
        if loss.is_none() {
            continue; // a later `trainer eval` line, not part of the run's curve
        }
        out.push(Point {
            epoch,
            loss,
            recall_at_1: r1,
        });
    }
    (baseline, out)
}

/// Writes the two-panel SVG to `path` (atomically).
pub fn write(path: &Path, title: &str, baseline: Option<f64>, points: &[Point]) -> Result<()> {
    let svg = render(title, baseline, points).map_err(|e| Error::file(path, e))?;
    crate::checkpoint::write_atomic(path, svg.as_bytes())
}

fn render(
    title: &str,
    baseline: Option<f64>,
    points: &[Point],
) -> std::result::Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 380)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let root = root
            .titled(title, ("sans-serif", 18))
            .map_err(|e| e.to_string())?;
        let (left, right) = root.split_horizontally(480);
        let max_epoch = points.iter().map(|p| p.epoch).fold(1.0, f64::max);

        let losses: Vec<(f64, f64)> = points
            .iter()
            .filter_map(|p| p.loss.map(|l| (p.epoch, l)))
            .collect();
        let max_loss = losses.iter().map(|p| p.1).fold(1e-6, f64::max) * 1.1;
        let mut chart = panel(&left, "training loss", max_epoch, 0.0..max_loss)?;
        chart
            .draw_series(LineSeries::new(losses.iter().copied(), RED.stroke_width(2)))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(losses.iter().map(|&p| Circle::new(p, 3, RED.filled())))
            .map_err(|e| e.to_string())?;

        let r1: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.epoch, 100.0 * p.recall_at_1))
            .collect();
        let lo = r1
            .iter()
            .map(|p| p.1)
            .chain(baseline.map(|b| 100.0 * b))
            .fold(100.0, f64::min);
        let lo = (lo - 5.0).max(0.0).floor();
        let mut chart = panel(&right, "test Recall@1 (%)", max_epoch, lo..100.0)?;
        if let Some(b) = baseline {
            chart
                .draw_series(LineSeries::new(
                    [(0.0, 100.0 * b), (max_epoch, 100.0 * b)],
                    BLACK.mix(0.5).stroke_width(1),
                ))
                .map_err(|e| e.to_string())?
                .label(format!("pretrained {:.1}", 100.0 * b))
                .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK.mix(0.5)));
        }
        let mut line: Vec<(f64, f64)> = baseline.map(|b| (0.0, 100.0 * b)).into_iter().collect();
        line.extend(r1.iter().copied());
        chart
            .draw_series(LineSeries::new(line, BLUE.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label("trained")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLUE));
        chart
            .draw_series(r1.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))
            .map_err(|e| e.to_string())?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
type Chart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// One panel: epochs on x, `y` on y, captioned, with its grid drawn.
fn panel<'a, 'b>(
    area: &'a Area<'b>,
    caption: &str,
    max_epoch: f64,
    y: std::ops::Range<f64>,
) -> std::result::Result<Chart<'a, 'b>, String> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(48)
        .build_cartesian_2d(0.0..max_epoch, y)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(chart)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_lines_become_points_and_an_svg() {
        let lines: Vec<serde_json::Value> = [
            r#"{"epoch":0,"model":"pretrained","recall@1":0.569}"#,
            r#"{"epoch":2,"loss":0.9,"recall@1":0.75}"#,
            r#"{"epoch":4,"loss":0.5,"recall@1":0.86}"#,
            r#"{"epoch":4,"model":"runs/x","recall@1":0.86}"#,
        ]
        .iter()
        .map(|s| serde_json::from_str(s).unwrap())
        .collect();
        let (baseline, pts) = points(&lines);
        assert_eq!(baseline, Some(0.569));
        assert_eq!(pts.len(), 2);
        assert_eq!(pts[1].loss, Some(0.5));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("curves.svg");
        write(&path, "run", baseline, &pts).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..60.min(svg.len())]);
        assert!(svg.contains("pretrained 56.9"));
        assert!(svg.contains("<polyline") || svg.contains("<path"));
        // No evaluated epoch yet: still a valid (empty) chart.
        write(&path, "run", None, &[]).unwrap();
    }
}
