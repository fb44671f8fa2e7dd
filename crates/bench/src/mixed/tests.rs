use super::*;

fn at(t_s: f64, rss_mib: f64) -> Sample {
    Sample {
        t_s,
        rss_mib,
        queue_depth: 0,
        submitted_urls: 0,
        completed_items: 0,
        failed_items: 0,
        queries: 0,
        errors: 0,
    }
}

#[test]
fn rss_is_judged_after_the_warm_up() {
    // Grows during the warm-up, then flat.
    let flat: Vec<Sample> =
        (0..=60).map(|i| at(f64::from(i) * 10.0, if i < 6 { 20.0 + f64::from(i) * 10.0 } else { 80.0 })).collect();
    let f = rss_figures(&flat, 60, 81.0);
    assert!(f.flat && f.slope_mib_per_min.abs() < 1e-9 && f.growth_mib.abs() < 1e-9, "{f:?}");
    assert!((f.after_warmup_mib - 80.0).abs() < 1e-9 && (f.at_end_mib - 80.0).abs() < 1e-9);
    // Grows 1 MiB a minute after it: 10 MiB over the ten minutes, not flat at 80 MiB.
    let growing: Vec<Sample> = (0..=60).map(|i| at(f64::from(i) * 10.0, 70.0 + f64::from(i) / 6.0)).collect();
    let g = rss_figures(&growing, 60, 80.0);
    assert!((g.slope_mib_per_min - 1.0).abs() < 1e-6, "{g:?}");
    assert!(g.growth_mib > 7.0 && !g.flat, "{g:?}");
    // Noise around a level is flat, however the first sample after the warm-up fell.
    let noisy: Vec<Sample> = (0..=60).map(|i| at(f64::from(i) * 10.0, if i % 2 == 0 { 60.0 } else { 67.0 })).collect();
    assert!(rss_figures(&noisy, 60, 70.0).flat);
}

#[test]
fn finds_warnings_in_a_coloured_log() {
    let log = "\x1b[2m2026-12-01T02:13:04.500803Z\x1b[0m \x1b[33m WARN\x1b[0m \x1b[2mcachectl_server::http\x1b[0m: full\n\
               2026-12-01T02:13:05Z ERROR cachectl_server::worker: Giving up\nplain line\n";
    assert_eq!(log_problems(log).len(), 2);
}

#[test]
fn sums_labelled_metrics() {
    let text = "# HELP x\ncachectl_items_finished_total{kind=\"refresh\",status=\"completed\"} 12\n\
                cachectl_items_finished_total{kind=\"prefetch\",status=\"completed\"} 3\n\
                cachectl_items_finished_total{kind=\"refresh\",status=\"failed\"} 1\n\
                cachectl_items_finished_total_other{status=\"completed\"} 100\n";
    assert_eq!(sum_metric(text, "cachectl_items_finished_total", "status=\"completed\""), 15);
    assert_eq!(sum_metric(text, "cachectl_items_finished_total", "status=\"failed\""), 1);
}

#[test]
fn the_mix_adds_up_and_every_query_is_well_formed() {
    assert_eq!(MIX.iter().map(|m| m.1).sum::<u32>(), 20);
    let recents: Recents = Arc::default();
    assert!(query(0, &recents, 1).is_err(), "nothing to ask about yet");
    recents.lock().unwrap().push_back(Recent { task_id: 7, account: 3, url: "http://www.acct03.test/a b".into() });
    let kinds: Vec<usize> = (0..20).map(|n| query(n, &recents, 1).unwrap().0).collect();
    for (k, (_, share)) in MIX.iter().enumerate() {
        assert_eq!(kinds.iter().filter(|&&x| x == k).count(), *share as usize);
    }
    let (_, native) = query(19, &recents, 1).unwrap();
    assert_eq!(native.path.as_str(), "/api/v1/items?task_id=7&limit=50");
    assert_eq!(native.headers[http::header::AUTHORIZATION], "Bearer bench-token-03");
    let (_, by_url) = query(10, &recents, 1).unwrap();
    assert!(by_url.path.as_str().contains("url=http%3A%2F%2Fwww.acct03.test%2Fa+b"), "{}", by_url.path);
}
