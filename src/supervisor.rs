//! A supervised tree of named tasks.
//!
//! Every task gets its own child of one root [`CancellationToken`]. The supervisor waits until
//! a stop is requested (a signal) or any task ends; then it stops the others one at a time in
//! reverse start order — a task started first (the HTTP server) stops last, after the tasks
//! that feed it have drained — all within one deadline. A task that ended with an error makes
//! the whole run an error; one that ended early without an error is reported too, since a
//! daemon's tasks are meant to run until told to stop.

use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinError, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

/// Any task failure, with its cause chain.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a supervised task returns.
pub type TaskResult = Result<(), BoxError>;

/// How a supervised run ended badly.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// A task returned an error.
    #[error("task {task} failed: {source}")]
    TaskFailed {
        /// The task's name.
        task: &'static str,
        /// Its error.
        source: BoxError,
    },
    /// A task panicked.
    #[error("task {task} panicked: {message}")]
    TaskPanicked {
        /// The task's name.
        task: &'static str,
        /// The panic payload, when it was a string.
        message: String,
    },
    /// A task returned before it was asked to stop.
    #[error("task {task} stopped on its own before shutdown was requested")]
    TaskEndedEarly {
        /// The task's name.
        task: &'static str,
    },
    /// Tasks were still running at the deadline and were aborted.
    #[error("shutdown deadline of {deadline:?} passed with tasks still running: {tasks:?}")]
    DeadlineExceeded {
        /// The deadline.
        deadline: Duration,
        /// Tasks that did not stop in time.
        tasks: Vec<&'static str>,
    },
}

type Joined = Result<(Id, TaskResult), JoinError>;

struct Running {
    name: &'static str,
    id: Id,
    token: CancellationToken,
}

/// Owns the daemon's tasks from start to stop.
pub struct Supervisor {
    root: CancellationToken,
    running: Vec<Running>,
    tasks: JoinSet<TaskResult>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl Supervisor {
    /// An empty tree.
    pub fn new() -> Self {
        Self {
            root: CancellationToken::new(),
            running: Vec::new(),
            tasks: JoinSet::new(),
        }
    }

    /// The root token: cancelling it stops every task at once.
    pub fn root_token(&self) -> CancellationToken {
        self.root.clone()
    }

    /// Starts `make(token)` as task `name`. The task must return soon after `token` fires.
    pub fn spawn<F, Fut>(&mut self, name: &'static str, make: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = TaskResult> + Send + 'static,
    {
        let token = self.root.child_token();
        let span = tracing::info_span!("task", name);
        let handle = self.tasks.spawn(make(token.clone()).instrument(span));

        self.running.push(Running {
            name,
            id: handle.id(),
            token,
        });
        info!(task = name, "task started");
    }

    /// Runs until `stop` resolves or a task ends, then stops everything within `deadline`.
    pub async fn run(
        mut self,
        stop: impl Future<Output = ()>,
        deadline: Duration,
    ) -> Result<(), SupervisorError> {
        let first_error = tokio::select! {
            () = stop => None,
            Some(joined) = self.tasks.join_next_with_id() => Some(self.ended_early(joined)),
        };
        match &first_error {
            None => info!("shutdown requested"),
            Some(error) => error!(error = %error, "stopping every task"),
        }

        let drained = self.stop_in_order(deadline).await;
        match (first_error, drained) {
            (Some(error), _) | (None, Err(error)) => Err(error),
            (None, Ok(())) => Ok(()),
        }
    }

    fn ended_early(&mut self, joined: Joined) -> SupervisorError {
        let (_, name, outcome) = self.finished(joined);
        failure(name, outcome).unwrap_or(SupervisorError::TaskEndedEarly { task: name })
    }

    /// Removes a finished task from the running list and names it.
    fn finished(&mut self, joined: Joined) -> (Id, &'static str, Result<TaskResult, JoinError>) {
        let id = match &joined {
            Ok((id, _)) => *id,
            Err(join_error) => join_error.id(),
        };
        let index = self.running.iter().position(|task| task.id == id);
        let name = index.map_or("unknown", |i| self.running.remove(i).name);
        (id, name, joined.map(|(_, result)| result))
    }

    /// Cancels the tasks newest first, waiting for each before cancelling the next.
    async fn stop_in_order(mut self, deadline: Duration) -> Result<(), SupervisorError> {
        let until = Instant::now() + deadline;
        let mut first_error = None;

        while let Some(task) = self.running.last() {
            let target = task.id;
            task.token.cancel();
            loop {
                let Ok(next) = tokio::time::timeout_at(until, self.tasks.join_next_with_id()).await
                else {
                    return Err(self.abort_all(deadline));
                };
                let Some(joined) = next else {
                    return first_error.map_or(Ok(()), Err);
                };
                let (id, name, outcome) = self.finished(joined);
                info!(task = name, "task stopped");
                if let Some(error) = failure(name, outcome) {
                    warn!(task = name, error = %error, "task failed while stopping");
                    first_error.get_or_insert(error);
                }
                if id == target {
                    break;
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn abort_all(mut self, deadline: Duration) -> SupervisorError {
        let tasks = self.running.drain(..).rev().map(|task| task.name).collect();
        self.tasks.abort_all();
        SupervisorError::DeadlineExceeded { deadline, tasks }
    }
}

/// The error a finished task reports, if any.
fn failure(name: &'static str, outcome: Result<TaskResult, JoinError>) -> Option<SupervisorError> {
    match outcome {
        Ok(Ok(())) => None,
        Ok(Err(source)) => Some(SupervisorError::TaskFailed { task: name, source }),
        Err(join_error) => Some(SupervisorError::TaskPanicked {
            task: name,
            message: panic_message(join_error),
        }),
    }
}

fn panic_message(join_error: JoinError) -> String {
    match join_error.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_owned()),
        Err(join_error) => join_error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn recorder() -> Arc<Mutex<Vec<&'static str>>> {
        Arc::new(Mutex::new(Vec::new()))
    }

    fn spawn_recording(
        supervisor: &mut Supervisor,
        name: &'static str,
        stopped: &Arc<Mutex<Vec<&'static str>>>,
    ) {
        let stopped = stopped.clone();
        supervisor.spawn(name, move |token| async move {
            token.cancelled().await;
            stopped.lock().expect("lock").push(name);
            Ok(())
        });
    }

    #[tokio::test]
    async fn requested_stop_stops_tasks_newest_first() {
        let stopped = recorder();
        let mut supervisor = Supervisor::new();
        for name in ["server", "trainer", "ingest"] {
            spawn_recording(&mut supervisor, name, &stopped);
        }

        let result = supervisor.run(async {}, Duration::from_secs(5)).await;

        assert!(result.is_ok(), "{result:?}");
        assert_eq!(
            *stopped.lock().expect("lock"),
            ["ingest", "trainer", "server"]
        );
    }

    #[tokio::test]
    async fn a_failing_task_stops_the_rest_and_is_reported() {
        let stopped = recorder();
        let mut supervisor = Supervisor::new();
        spawn_recording(&mut supervisor, "server", &stopped);
        spawn_recording(&mut supervisor, "trainer", &stopped);
        supervisor.spawn("ingest", |_| async { Err("broker unreachable".into()) });

        let error = supervisor
            .run(std::future::pending(), Duration::from_secs(5))
            .await
            .expect_err("the failure is reported");

        assert_eq!(error.to_string(), "task ingest failed: broker unreachable");
        assert_eq!(*stopped.lock().expect("lock"), ["trainer", "server"]);
    }

    #[tokio::test]
    async fn a_panicking_task_is_named() {
        let mut supervisor = Supervisor::new();
        supervisor.spawn("trainer", |_| async { panic!("boom") });

        let error = supervisor
            .run(std::future::pending(), Duration::from_secs(5))
            .await
            .expect_err("the panic is reported");

        assert_eq!(error.to_string(), "task trainer panicked: boom");
    }

    #[tokio::test]
    async fn a_task_ignoring_cancellation_hits_the_deadline() {
        let mut supervisor = Supervisor::new();
        supervisor.spawn("stubborn", |_| async {
            std::future::pending::<()>().await;
            Ok(())
        });

        let error = supervisor
            .run(async {}, Duration::from_millis(50))
            .await
            .expect_err("deadline");

        assert!(matches!(
            error,
            SupervisorError::DeadlineExceeded { ref tasks, .. } if tasks == &["stubborn"]
        ));
    }

    #[tokio::test]
    async fn a_task_ending_early_without_error_is_still_an_error() {
        let mut supervisor = Supervisor::new();
        supervisor.spawn("ingest", |_| async { Ok(()) });

        let error = supervisor
            .run(std::future::pending(), Duration::from_secs(1))
            .await
            .expect_err("early end");

        assert!(matches!(
            error,
            SupervisorError::TaskEndedEarly { task: "ingest" }
        ));
    }
}
