//! Reading figures out of a Prometheus text exposition (`GET /metrics` of the cloud or the
//! terminal), as the tests check them.

/// The value of the sample printed exactly as `series` — a name, with its labels when it has
/// any (`errors_total{code="POS_SYNC_RATE_LIMITED"}`); `None` when there is none.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The sum of every sample of metric `name`, whatever its labels (0 when there is none).
pub fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP errors_total x\n\
        errors_total{code=\"A\"} 2\n\
        errors_total{code=\"B\"} 3\n\
        errors_total_other 9\n\
        queued_events 7\n";

    #[test]
    fn a_sample_by_its_exact_series_and_a_metric_summed_over_labels() {
        assert_eq!(sample(TEXT, "queued_events"), Some(7.0));
        assert_eq!(sample(TEXT, "errors_total{code=\"B\"}"), Some(3.0));
        assert_eq!(sample(TEXT, "errors_total"), None, "labelled samples only");
        assert_eq!(sample(TEXT, "missing"), None);
        assert_eq!(sum(TEXT, "errors_total"), 5.0, "not errors_total_other");
        assert_eq!(sum(TEXT, "missing"), 0.0);
    }
}
