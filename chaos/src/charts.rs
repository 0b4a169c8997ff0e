//! The report's charts, drawn with plotters into SVG strings that the HTML report inlines:
//! throughput by outcome, latency p50/p99, queue depths, kernel evidence. The fault window is
//! shaded and the phase boundaries are marked on every chart.

use crate::analysis::{Point, QueuePoint};
use plotters::prelude::*;

/// A vertical mark on the time axis.
#[derive(Debug, Clone)]
pub struct Mark {
    pub t_s: f64,
    pub label: String,
}

/// What every chart shares: the time axis, the fault window and the phase marks.
#[derive(Debug, Clone)]
pub struct Frame {
    pub end_s: f64,
    pub fault: (f64, f64),
    pub marks: Vec<Mark>,
}

/// A named series of `(t_s, value)` points.
pub struct Line<'a> {
    pub name: &'a str,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
}

const FAULT_FILL: RGBColor = RGBColor(255, 200, 200);

fn draw(title: &str, y_label: &str, frame: &Frame, lines: &[Line<'_>]) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 280)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let y_max = lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.1))
            .fold(0.0f64, f64::max)
            .max(1.0)
            * 1.15;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..frame.end_s.max(1.0), 0f64..y_max)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("seconds since the load started")
            .y_desc(y_label)
            .light_line_style(WHITE)
            .draw()
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(frame.fault.0, 0.0), (frame.fault.1, y_max)],
                FAULT_FILL.mix(0.5).filled(),
            )))
            .map_err(|e| e.to_string())?
            .label("fault")
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], FAULT_FILL.filled()));
        for m in &frame.marks {
            chart
                .draw_series(LineSeries::new(
                    [(m.t_s, 0.0), (m.t_s, y_max)],
                    BLACK.mix(0.3),
                ))
                .map_err(|e| e.to_string())?;
            chart
                .draw_series(std::iter::once(Text::new(
                    m.label.clone(),
                    (m.t_s, y_max * 0.97),
                    ("sans-serif", 11).into_font().color(&BLACK.mix(0.6)),
                )))
                .map_err(|e| e.to_string())?;
        }
        for l in lines {
            let color = l.color;
            chart
                .draw_series(LineSeries::new(
                    l.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| e.to_string())?
                .label(l.name)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 15, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    // Inline SVG in HTML needs no namespace declarations; dropping them keeps the report free
    // of any URL.
    Ok(svg
        .replace(" xmlns=\"http://www.w3.org/2000/svg\"", "")
        .replace(" xmlns:xlink=\"http://www.w3.org/1999/xlink\"", ""))
}

/// Orders per second by outcome.
pub fn throughput(frame: &Frame, points: &[Point]) -> Result<String, String> {
    let pick = |f: fn(&Point) -> u64| points.iter().map(|p| (p.t_s, f(p) as f64)).collect();
    draw(
        "Orders per second by outcome",
        "orders/s",
        frame,
        &[
            Line {
                name: "201 accepted",
                color: RGBColor(46, 139, 87),
                points: pick(|p| p.accepted),
            },
            Line {
                name: "202 queued",
                color: RGBColor(230, 140, 0),
                points: pick(|p| p.queued),
            },
            Line {
                name: "errors",
                color: RGBColor(200, 30, 30),
                points: pick(|p| p.errors),
            },
        ],
    )
}

/// Acknowledged-order latency per second.
pub fn latency(frame: &Frame, points: &[Point]) -> Result<String, String> {
    let pick = |f: fn(&Point) -> f64| {
        points
            .iter()
            .filter(|p| p.sent > 0)
            .map(|p| (p.t_s, f(p)))
            .collect()
    };
    draw(
        "Latency of acknowledged orders (from intended send time)",
        "ms",
        frame,
        &[
            Line {
                name: "p50",
                color: RGBColor(30, 100, 200),
                points: pick(|p| p.p50_ms),
            },
            Line {
                name: "p99",
                color: RGBColor(130, 30, 160),
                points: pick(|p| p.p99_ms),
            },
        ],
    )
}

/// Queue depths: the gateway's retry queue, the engine's outbox, persistence's lag.
pub fn queues(frame: &Frame, points: &[QueuePoint]) -> Result<String, String> {
    let pick = |f: fn(&QueuePoint) -> Option<f64>| {
        points.iter().filter_map(|p| Some((p.t_s, f(p)?))).collect()
    };
    draw(
        "Queue depths",
        "entries / events",
        frame,
        &[
            Line {
                name: "gateway retry queue",
                color: RGBColor(230, 140, 0),
                points: pick(|p| p.spool),
            },
            Line {
                name: "engine outbox lag",
                color: RGBColor(30, 100, 200),
                points: pick(|p| p.outbox_lag),
            },
            Line {
                name: "persistence lag",
                color: RGBColor(46, 139, 87),
                points: pick(|p| p.persistence_lag),
            },
        ],
    )
}

/// Kernel evidence from the eBPF agent, when it ran.
pub fn kernel(frame: &Frame, points: &[QueuePoint]) -> Option<Result<String, String>> {
    let retr: Vec<(f64, f64)> = points
        .iter()
        .filter_map(|p| Some((p.t_s, p.retransmits_per_s?)))
        .collect();
    let fails: Vec<(f64, f64)> = points
        .iter()
        .filter_map(|p| Some((p.t_s, p.connect_failures_per_s?)))
        .collect();
    if retr.is_empty() && fails.is_empty() {
        return None;
    }
    Some(draw(
        "Kernel evidence (eBPF): TCP retransmits and failed connects",
        "per second",
        frame,
        &[
            Line {
                name: "retransmitted segments",
                color: RGBColor(200, 30, 30),
                points: retr,
            },
            Line {
                name: "failed connects",
                color: RGBColor(90, 90, 90),
                points: fails,
            },
        ],
    ))
}
