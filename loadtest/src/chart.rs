//! The picture: message rates, delivery rates and latency percentiles over time, as SVG.

use std::path::Path;

use plotters::prelude::*;

use crate::LoadtestError;
use crate::live::TimelinePoint;

/// A line: its legend, colour and value at each point (none: no point drawn there).
type Series = (&'static str, RGBColor, fn(&TimelinePoint) -> Option<f64>);

pub fn draw(path: &Path, title: &str, timeline: &[TimelinePoint]) -> Result<(), LoadtestError> {
    draw_inner(path, title, timeline).map_err(|e| LoadtestError::Chart(e.to_string()))
}

fn draw_inner(
    path: &Path,
    title: &str,
    timeline: &[TimelinePoint],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1000, 1000)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let (messages_area, rest) = root.split_vertically(320);
    let (deliveries_area, latency_area) = rest.split_vertically(320);
    // Messages and deliveries on separate axes: a group's deliveries are its messages times
    // its members, which would flatten the message lines to the floor of a shared axis.
    let messages: [Series; 2] = [
        ("sent", BLUE, |p| Some(p.counts.sent as f64)),
        ("acked", GREEN, |p| Some(p.counts.acked as f64)),
    ];
    panel(
        &messages_area,
        "messages (per second)",
        "messages/s",
        timeline,
        &messages,
    )?;
    let deliveries: [Series; 1] = [("delivered", RED, |p| Some(p.counts.delivered as f64))];
    panel(
        &deliveries_area,
        "deliveries to recipients (per second)",
        "deliveries/s",
        timeline,
        &deliveries,
    )?;
    let latencies: [Series; 4] = [
        ("delivery p50", BLUE, |p| {
            (p.delivery.count > 0).then_some(p.delivery.p50_ms)
        }),
        ("delivery p99", RED, |p| {
            (p.delivery.count > 0).then_some(p.delivery.p99_ms)
        }),
        ("delivery p99.9", MAGENTA, |p| {
            (p.delivery.count > 0).then_some(p.delivery.p999_ms)
        }),
        ("ack p99", GREEN, |p| {
            (p.ack.count > 0).then_some(p.ack.p99_ms)
        }),
    ];
    panel(
        &latency_area,
        "latency from scheduled send (ms)",
        "ms",
        timeline,
        &latencies,
    )?;
    root.present()?;
    Ok(())
}

fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    caption: &str,
    unit: &str,
    timeline: &[TimelinePoint],
    series: &[Series],
) -> Result<(), Box<dyn std::error::Error>> {
    let t_max = timeline.last().map_or(1.0, |p| p.t_secs).max(1.0);
    let y_max = timeline
        .iter()
        .flat_map(|p| series.iter().filter_map(|(_, _, value)| value(p)))
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .y_desc(unit)
        .draw()?;
    for &(label, color, value) in series {
        chart
            .draw_series(LineSeries::new(
                timeline
                    .iter()
                    .filter_map(|p| value(p).map(|v| (p.t_secs, v))),
                color,
            ))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_panel_as_svg() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.svg");
        let report = crate::report::tests::sample_report();
        draw(&path, "dm-steady", &report.timeline).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
        for text in [
            "messages (per second)",
            "deliveries to recipients",
            "latency from scheduled send",
            "delivery p99",
            "acked",
        ] {
            assert!(svg.contains(text), "missing {text}");
        }
        assert!(svg.contains("<polyline"), "no line drawn");
    }
}
