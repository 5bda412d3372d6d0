//! `rebeld experiment shift`: a controlled preference shift in the log-linear setting.
//!
//! For every seed a [`Setting`] is drawn; for every number of pairs `n` and every method, the
//! policy is trained on pairs labelled by users mixed as `α_train` (the same random draws
//! for every method of a seed and `n`), then judged exactly under each test mixture `α_test`:
//! the KL-regularized suboptimality, its worst case and mean over the test mixtures, its
//! value at `α_train`, and the parameter error `‖θ − θ*_{α_train}‖`. The report holds the
//! mean of each over the seeds with a 95% Student-t confidence interval.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::config::Objective;

use super::learner::{train, Method, Schedule};
use super::setting::{distance, Setting, Shape};
use super::ExperimentError;

/// Everything `rebeld experiment shift` can be told.
#[derive(Debug, Clone, PartialEq)]
pub struct ShiftOptions {
    /// The sizes and scales of the setting.
    pub shape: Shape,
    /// Rounds, η, `α_train`, labels.
    pub schedule: Schedule,
    /// The total numbers of training pairs compared.
    pub sizes: Vec<usize>,
    /// The radii tried by `chi2`, `kl` and `wasserstein`.
    pub radii: Vec<f64>,
    /// The objectives compared.
    pub objectives: Vec<Objective>,
    /// The held-out mixtures.
    pub test_mixtures: Vec<Vec<f64>>,
    /// Seeds `first_seed..first_seed + seeds`.
    pub seeds: u64,
    /// The first seed.
    pub first_seed: u64,
    /// Worker threads, one seed at a time each.
    pub threads: usize,
}

impl ShiftOptions {
    /// Checks every option, naming the flag of the first one out of range.
    pub fn validate(&self) -> Result<(), ExperimentError> {
        let shape = &self.shape;
        let k = shape.objectives;
        check(shape.dim >= 1, "--dim", "must be at least 1")?;
        check(k >= 1, "--objectives", "must be at least 1")?;
        check(shape.responses >= 2, "--responses", "must be at least 2")?;
        check(shape.contexts >= 1, "--contexts", "must be at least 1")?;
        check(
            positive(shape.beta),
            "--beta",
            "must be finite and positive",
        )?;
        check(
            positive(shape.reward_scale),
            "--reward-scale",
            "must be positive",
        )?;
        check(
            positive(self.schedule.eta),
            "--eta",
            "must be finite and positive",
        )?;
        check(self.schedule.rounds >= 1, "--rounds", "must be at least 1")?;
        check(
            self.schedule.wasserstein_order >= 1.0,
            "--order",
            "must be at least 1",
        )?;
        let confidence = self.schedule.confidence;
        check(
            confidence > 0.5 && confidence < 1.0,
            "--confidence",
            "must be in (0.5, 1)",
        )?;
        check(
            self.seeds >= 2,
            "--seeds",
            "must be at least 2 for an interval",
        )?;
        check(self.threads >= 1, "--threads", "must be at least 1")?;
        check(!self.sizes.is_empty(), "--n", "needs at least one size")?;
        check(
            self.sizes.iter().all(|&n| n >= 1),
            "--n",
            "sizes must be positive",
        )?;
        check(
            !self.objectives.is_empty(),
            "--methods",
            "needs at least one objective",
        )?;
        let radii_ok = self.radii.iter().all(|r| r.is_finite() && *r >= 0.0);
        check(radii_ok, "--radii", "radii must be finite and at least 0")?;
        check(
            !self.radii.is_empty(),
            "--radii",
            "needs at least one radius",
        )?;
        check_mixture(&self.schedule.train_mixture, k, "--train-mixture")?;
        check(
            !self.test_mixtures.is_empty(),
            "--test-mixtures",
            "needs a mixture",
        )?;
        self.test_mixtures
            .iter()
            .try_for_each(|m| check_mixture(m, k, "--test-mixtures"))
    }

    /// The methods in table order: each objective once, or once per radius.
    pub fn methods(&self) -> Vec<Method> {
        let mut methods = Vec::new();
        for &objective in &self.objectives {
            match uses_radius(objective) {
                true => methods.extend(
                    self.radii
                        .iter()
                        .map(|&radius| Method { objective, radius }),
                ),
                false => methods.push(Method {
                    objective,
                    radius: 0.0,
                }),
            }
        }
        methods
    }
}

/// The default held-out mixtures for `train`: itself, halfway to uniform, uniform, and every
/// single objective alone.
pub fn default_test_mixtures(train: &[f64]) -> Vec<Vec<f64>> {
    let k = train.len();
    let uniform = vec![1.0 / k as f64; k];
    let halfway = train
        .iter()
        .zip(&uniform)
        .map(|(a, u)| 0.5 * (a + u))
        .collect();
    let mut mixtures = vec![train.to_vec(), halfway, uniform];
    mixtures.extend((0..k).map(|i| (0..k).map(|j| f64::from(u8::from(i == j))).collect()));
    mixtures
}

/// The default training mixture over `k` objectives: shares halving from the first.
pub fn default_train_mixture(k: usize) -> Vec<f64> {
    let raw: Vec<f64> = (0..k).map(|i| 0.5f64.powi(i as i32)).collect();
    let total: f64 = raw.iter().sum();
    raw.iter().map(|w| w / total).collect()
}

/// Whether `objective` reads the radius.
fn uses_radius(objective: Objective) -> bool {
    matches!(
        objective,
        Objective::Chi2 | Objective::Kl | Objective::Wasserstein
    )
}

fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

fn check(ok: bool, option: &'static str, reason: &str) -> Result<(), ExperimentError> {
    match ok {
        true => Ok(()),
        false => Err(ExperimentError::InvalidOption {
            option,
            reason: reason.to_owned(),
        }),
    }
}

fn check_mixture(mixture: &[f64], k: usize, option: &'static str) -> Result<(), ExperimentError> {
    let reason = if mixture.len() != k {
        format!(
            "{mixture:?} has {} weights, but there are {k} objectives",
            mixture.len()
        )
    } else if mixture.iter().any(|w| !(w.is_finite() && *w >= 0.0)) {
        format!("{mixture:?} has a negative or non-finite weight")
    } else if (mixture.iter().sum::<f64>() - 1.0).abs() > 1e-6 {
        format!("{mixture:?} does not sum to 1")
    } else {
        return Ok(());
    };
    Err(ExperimentError::InvalidOption { option, reason })
}

/// What one trained policy scored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    /// The largest suboptimality over the test mixtures.
    pub worst: f64,
    /// The mean suboptimality over the test mixtures.
    pub mean: f64,
    /// The suboptimality under `α_train`.
    pub train: f64,
    /// `‖θ − θ*_{α_train}‖`.
    pub error: f64,
}

/// Trains `method` on `n` pairs of `setting` and judges the final policy.
pub fn run_one(
    setting: &Setting,
    method: Method,
    n: usize,
    options: &ShiftOptions,
    seed: u64,
) -> Result<Outcome, ExperimentError> {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ n as u64);
    let trajectory = train(setting, method, n, &options.schedule, &mut rng)?;
    let theta = trajectory.last().map_or(setting.reference(), Vec::as_slice);
    Ok(judge(setting, theta, options))
}

/// The exact scores of the policy `theta`.
pub fn judge(setting: &Setting, theta: &[f64], options: &ShiftOptions) -> Outcome {
    let losses: Vec<f64> = options
        .test_mixtures
        .iter()
        .map(|mixture| setting.suboptimality(theta, mixture))
        .collect();
    let train_mixture = &options.schedule.train_mixture;
    Outcome {
        worst: losses.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        mean: losses.iter().sum::<f64>() / losses.len() as f64,
        train: setting.suboptimality(theta, train_mixture),
        error: distance(theta, &setting.optimum(train_mixture)),
    }
}

/// One seed's outcomes: the exact optimum of `α_train` first, then `[size][method]`.
struct SeedOutcomes {
    optimum: Outcome,
    trained: Vec<Vec<Outcome>>,
}

/// Every method and size on one seed.
fn run_seed(options: &ShiftOptions, seed: u64) -> Result<SeedOutcomes, ExperimentError> {
    let setting = Setting::draw(options.shape, seed);
    let optimum = setting.optimum(&options.schedule.train_mixture);
    let methods = options.methods();
    let trained = options
        .sizes
        .iter()
        .map(|&n| {
            methods
                .iter()
                .map(|&method| run_one(&setting, method, n, options, seed))
                .collect()
        })
        .collect::<Result<_, _>>()?;
    Ok(SeedOutcomes {
        optimum: judge(&setting, &optimum, options),
        trained,
    })
}

/// Runs every seed on `options.threads` threads, calling `progress(done, total)` after each.
pub fn run(
    options: &ShiftOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<ShiftReport, ExperimentError> {
    options.validate()?;
    let next = AtomicU64::new(0);
    let results = Mutex::new(Vec::new());
    let worker = || -> Result<(), ExperimentError> {
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            if index >= options.seeds {
                return Ok(());
            }
            let outcome = run_seed(options, options.first_seed + index)?;
            let mut done = results.lock().map_err(|_| ExperimentError::Worker)?;
            done.push((index, outcome));
            progress(done.len() as u64, options.seeds);
        }
    };

    let threads = options.threads.min(options.seeds as usize);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads).map(|_| scope.spawn(worker)).collect();
        handles
            .into_iter()
            .try_for_each(|handle| handle.join().map_err(|_| ExperimentError::Worker)?)
    })?;

    let mut per_seed = results.into_inner().map_err(|_| ExperimentError::Worker)?;
    per_seed.sort_by_key(|(index, _): &(u64, SeedOutcomes)| *index);
    let per_seed: Vec<_> = per_seed.into_iter().map(|(_, outcome)| outcome).collect();
    Ok(ShiftReport::summarize(options, &per_seed))
}

/// A mean over seeds with the half-width of its 95% confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Estimate {
    /// The sample mean.
    pub mean: f64,
    /// `t_{0.975, s−1}·sd/sqrt(s)` over `s` seeds.
    pub half_width: f64,
}

impl Estimate {
    /// The mean of `values` and its 95% Student-t interval.
    pub fn of(values: &[f64]) -> Self {
        let s = values.len() as f64;
        let mean = values.iter().sum::<f64>() / s;
        let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (s - 1.0);
        Self {
            mean,
            half_width: student_t_975(values.len() - 1) * (variance / s).sqrt(),
        }
    }
}

impl fmt::Display for Estimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ± {}",
            significant(self.mean),
            significant(self.half_width)
        )
    }
}

/// Three significant figures, without an exponent for the magnitudes of this table; rounding
/// noise below 1e-8 prints as 0.
fn significant(x: f64) -> String {
    if x.abs() < 1e-8 {
        return "0".to_owned();
    }
    if !x.is_finite() {
        return format!("{x}");
    }
    let decimals = (2 - x.abs().log10().floor() as i32).clamp(0, 8) as usize;
    format!("{x:.decimals$}")
}

/// The 97.5% quantile of Student's t with `df` degrees of freedom: exact to three decimals
/// for `df ≤ 10`, the Cornish–Fisher expansion (three terms) beyond, within 1e-3 there.
pub fn student_t_975(df: usize) -> f64 {
    const SMALL: [f64; 10] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    ];
    if let Some(&t) = df.checked_sub(1).and_then(|i| SMALL.get(i)) {
        return t;
    }
    let z: f64 = 1.959_963_985;
    let n = df as f64;
    let first = (z.powi(3) + z) / (4.0 * n);
    let second = (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * n * n);
    let third =
        (3.0 * z.powi(7) + 19.0 * z.powi(5) + 17.0 * z.powi(3) - 15.0 * z) / (384.0 * n.powi(3));
    z + first + second + third
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReportRow {
    /// The objective's name, or what the row stands for.
    pub objective: String,
    /// ρ, for the objectives that read it.
    pub radius: Option<f64>,
    /// Training pairs; none for the exact optimum.
    pub n: Option<usize>,
    /// Worst-case suboptimality over the test mixtures.
    pub worst: Estimate,
    /// Mean suboptimality over the test mixtures.
    pub mean: Estimate,
    /// Suboptimality under `α_train`.
    pub train: Estimate,
    /// `‖θ − θ*_{α_train}‖`.
    pub error: Estimate,
    /// The worst case minus `rebel`'s on the same seed and size: paired, so its interval
    /// leaves out the spread between settings. None where there is no `rebel` row to pair with.
    pub worst_vs_rebel: Option<Estimate>,
}

/// The table of `rebeld experiment shift`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ShiftReport {
    /// How many seeds each mean is over.
    pub seeds: u64,
    /// One row per method and size, sizes inner.
    pub rows: Vec<ReportRow>,
}

impl ShiftReport {
    /// Means and intervals over the seeds: the optimum's row, then method by method.
    fn summarize(options: &ShiftOptions, per_seed: &[SeedOutcomes]) -> Self {
        let methods = options.methods();
        let rebel = methods.iter().position(|m| m.objective == Objective::Rebel);
        let optimum = summarize_row("optimum of α_train", None, None, per_seed, |o| &o.optimum);
        let mut rows = vec![optimum];
        for (m, method) in methods.iter().enumerate() {
            for (s, &n) in options.sizes.iter().enumerate() {
                let mut row = summarize_row(
                    objective_name(method.objective),
                    uses_radius(method.objective).then_some(method.radius),
                    Some(n),
                    per_seed,
                    |o| &o.trained[s][m],
                );
                row.worst_vs_rebel = rebel.map(|r| {
                    let paired: Vec<f64> = per_seed
                        .iter()
                        .map(|o| o.trained[s][m].worst - o.trained[s][r].worst)
                        .collect();
                    Estimate::of(&paired)
                });
                rows.push(row);
            }
        }
        Self {
            seeds: per_seed.len() as u64,
            rows,
        }
    }
}

/// One row: the means over the seeds of the outcome `pick` chooses.
fn summarize_row(
    label: &str,
    radius: Option<f64>,
    n: Option<usize>,
    per_seed: &[SeedOutcomes],
    pick: impl Fn(&SeedOutcomes) -> &Outcome,
) -> ReportRow {
    let estimate = |field: fn(&Outcome) -> f64| -> Estimate {
        let values: Vec<f64> = per_seed.iter().map(|o| field(pick(o))).collect();
        Estimate::of(&values)
    };
    ReportRow {
        objective: label.to_owned(),
        radius,
        n,
        worst: estimate(|o| o.worst),
        mean: estimate(|o| o.mean),
        train: estimate(|o| o.train),
        error: estimate(|o| o.error),
        worst_vs_rebel: None,
    }
}

impl fmt::Display for ShiftReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "| objective | ρ | n | worst-case subopt. | worst − rebel's (paired) | mean subopt. \
             | subopt. at α_train | ‖θ − θ*‖ |"
        )?;
        writeln!(f, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
        for row in &self.rows {
            let radius = row.radius.map_or("–".to_owned(), |r| r.to_string());
            let n = row.n.map_or("∞".to_owned(), |n| n.to_string());
            let paired = row.worst_vs_rebel.map_or("–".to_owned(), |e| e.to_string());
            writeln!(
                f,
                "| {} | {radius} | {n} | {} | {paired} | {} | {} | {} |",
                row.objective, row.worst, row.mean, row.train, row.error
            )?;
        }
        Ok(())
    }
}

/// The name `train.objective` gives `objective`.
pub fn objective_name(objective: Objective) -> &'static str {
    match objective {
        Objective::Rebel => "rebel",
        Objective::Chi2 => "chi2",
        Objective::Kl => "kl",
        Objective::Wasserstein => "wasserstein",
        Objective::Dpo => "dpo",
        Objective::Ipo => "ipo",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::experiment::learner::Labels;

    fn options() -> ShiftOptions {
        let train_mixture = default_train_mixture(2);
        ShiftOptions {
            shape: Shape {
                dim: 3,
                objectives: 2,
                responses: 4,
                contexts: 8,
                reward_scale: 2.0,
                beta: 1.0,
            },
            schedule: Schedule {
                rounds: 2,
                eta: 0.5,
                train_mixture: train_mixture.clone(),
                labels: Labels::Preferences,
                confidence: 0.75,
                wasserstein_order: 2.0,
            },
            sizes: vec![40, 80],
            radii: vec![0.1, 0.3],
            objectives: vec![Objective::Rebel, Objective::Chi2, Objective::Dpo],
            test_mixtures: default_test_mixtures(&train_mixture),
            seeds: 3,
            first_seed: 7,
            threads: 2,
        }
    }

    #[test]
    fn student_t_quantiles_match_tables() {
        for (df, t) in [
            (1, 12.706),
            (4, 2.776),
            (5, 2.571),
            (11, 2.201),
            (15, 2.131),
            (30, 2.042),
        ] {
            assert!((student_t_975(df) - t).abs() < 2e-3, "df {df}");
        }
    }

    #[test]
    fn estimate_is_mean_and_t_interval() {
        // Sample sd of 1, 2, 3 is 1; the half-width is t_{0.975, 2}/sqrt(3).
        let estimate = Estimate::of(&[1.0, 2.0, 3.0]);
        assert_eq!(estimate.mean, 2.0);
        assert!((estimate.half_width - 4.303 / 3f64.sqrt()).abs() < 1e-12);
        assert_eq!(estimate.to_string(), "2.00 ± 2.48");
    }

    #[test]
    fn default_mixtures_lie_on_the_simplex() {
        let train = default_train_mixture(3);
        assert!((train[0] - 4.0 / 7.0).abs() < 1e-15);
        let tests = default_test_mixtures(&train);
        assert_eq!(tests.len(), 6);
        for mixture in &tests {
            check_mixture(mixture, 3, "--test-mixtures").unwrap();
        }
        assert_eq!(tests[5], vec![0.0, 0.0, 1.0]);
    }

    #[test]
    fn validation_names_the_flag() {
        let mut bad = options();
        bad.schedule.train_mixture = vec![0.5, 0.6];
        let error = bad.validate().unwrap_err().to_string();
        assert!(error.starts_with("--train-mixture:"), "{error}");

        let mut bad = options();
        bad.seeds = 1;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("--seeds:"));
    }

    #[test]
    fn report_has_a_row_per_method_and_size_and_repeats_itself() {
        let options = options();
        let report = run(&options, &|_, _| {}).unwrap();
        // The optimum, then rebel, chi2 at two radii, dpo; two sizes each.
        assert_eq!(report.rows.len(), 9);
        assert_eq!(report.seeds, 3);
        assert_eq!(report.rows[3].radius, Some(0.1));
        assert_eq!(report.rows[0].error.mean, 0.0);
        assert_eq!(report.rows[1].worst_vs_rebel.unwrap().mean, 0.0);
        assert_eq!(report.rows[0].worst_vs_rebel, None);
        for row in &report.rows {
            assert!(row.worst.mean >= row.mean.mean && row.mean.mean > 0.0);
            assert!(row.n.is_none() || row.error.mean > 0.0);
        }

        let again = run(&options, &|_, _| {}).unwrap();
        assert_eq!(report, again);
    }
}
