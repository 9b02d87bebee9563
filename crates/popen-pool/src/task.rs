//! Task types, the per-worker state they share, and the registry a worker
//! program serves.

use std::any::{Any, TypeId};
use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::TaskFailure;

/// A unit of work that runs in a worker process.
///
/// Rust cannot send closures to another process, so code reaches the worker by
/// name: the parent serializes the task value, the worker program looks its
/// [`NAME`](Task::NAME) up in its [`Registry`] and calls [`run`](Task::run).
///
/// # Examples
///
/// ```
/// use popen_pool::{Task, TaskFailure, WorkerContext};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Square(u64);
///
/// impl Task for Square {
///     const NAME: &'static str = "square";
///     type Output = u64;
///     fn run(self, _ctx: &mut WorkerContext) -> Result<u64, TaskFailure> {
///         self.0.checked_mul(self.0).ok_or_else(|| TaskFailure::msg("overflow"))
///     }
/// }
/// ```
pub trait Task: Serialize + DeserializeOwned + Send + 'static {
    /// The name the worker program registers this type under; unique per program.
    const NAME: &'static str;
    /// What the task returns to the parent.
    type Output: Serialize + DeserializeOwned + Send + 'static;
    /// Runs in the worker process. A panic is caught and reported as a
    /// [`PoolError::Task`](crate::PoolError::Task) of kind `"panic"`.
    ///
    /// # Errors
    ///
    /// Whatever the task reports; it reaches the parent as
    /// [`PoolError::Task`](crate::PoolError::Task).
    fn run(self, ctx: &mut WorkerContext) -> Result<Self::Output, TaskFailure>;
}

/// State that lives in one worker process across tasks.
///
/// A type map: an initializer stores a value, later tasks read or change it
/// (loaded modules, buffers, caches). It dies with the worker process.
#[derive(Default)]
pub struct WorkerContext {
    values: HashMap<TypeId, Box<dyn Any + Send>>,
    tasks_run: u64,
}

impl fmt::Debug for WorkerContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerContext")
            .field("values", &self.values.len())
            .field("tasks_run", &self.tasks_run)
            .finish()
    }
}

impl WorkerContext {
    /// Stores a value, returning the previous value of the same type.
    pub fn insert<T: Any + Send>(&mut self, value: T) -> Option<T> {
        self.values
            .insert(TypeId::of::<T>(), Box::new(value))
            .and_then(|old| old.downcast().ok().map(|b| *b))
    }

    /// The stored value of type `T`, if any.
    pub fn get<T: Any + Send>(&self) -> Option<&T> {
        self.values.get(&TypeId::of::<T>()).and_then(|b| b.downcast_ref())
    }

    /// The stored value of type `T`, mutably.
    pub fn get_mut<T: Any + Send>(&mut self) -> Option<&mut T> {
        self.values.get_mut(&TypeId::of::<T>()).and_then(|b| b.downcast_mut())
    }

    /// The stored value of type `T`, inserting `T::default()` first if absent.
    pub fn get_or_default<T: Any + Send + Default>(&mut self) -> &mut T {
        self.values
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Box::new(T::default()))
            .downcast_mut()
            .expect("type map entry has the type of its key")
    }

    /// Removes and returns the stored value of type `T`.
    pub fn remove<T: Any + Send>(&mut self) -> Option<T> {
        self.values.remove(&TypeId::of::<T>()).and_then(|b| b.downcast().ok().map(|b| *b))
    }

    /// How many tasks this worker process has run before the current one
    /// (the initializer included).
    pub fn tasks_run(&self) -> u64 {
        self.tasks_run
    }

    pub(crate) fn count_task(&mut self) {
        self.tasks_run += 1;
    }
}

pub(crate) type Handler = fn(&[u8], &mut WorkerContext) -> Result<Vec<u8>, TaskFailure>;

/// The task types a worker program serves, by name.
///
/// # Examples
///
/// ```
/// # use popen_pool::{Task, TaskFailure, WorkerContext, Registry};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)] struct Square(u64);
/// # impl Task for Square {
/// #     const NAME: &'static str = "square"; type Output = u64;
/// #     fn run(self, _: &mut WorkerContext) -> Result<u64, TaskFailure> { Ok(self.0 * self.0) }
/// # }
/// let registry = Registry::new().register::<Square>();
/// assert_eq!(registry.names(), vec!["square"]);
/// ```
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<&'static str, (TypeId, Handler)>,
    before_fork: Option<fn()>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").field("tasks", &self.names()).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers task type `T` under [`T::NAME`](Task::NAME).
    ///
    /// # Panics
    ///
    /// If another type is already registered under the same name: that is a
    /// programming error in the worker program.
    #[must_use]
    pub fn register<T: Task>(mut self) -> Self {
        let previous = self.handlers.insert(T::NAME, (TypeId::of::<T>(), handle::<T>));
        assert!(
            previous.is_none_or(|(ty, _)| ty == TypeId::of::<T>()),
            "two task types are registered under the name {:?}",
            T::NAME
        );
        self
    }

    /// Runs `hook` in a zygote ([`Zygote`](crate::Zygote)) right before
    /// each fork, so every worker it forks inherits what the hook prepared
    /// (a cache refreshed, a file read once for all workers). Only a zygote
    /// calls it; a spawned worker never does. The hook runs on the zygote's
    /// only thread: it must not start threads (a fork copies only the
    /// calling thread, so the zygote forks only while it has one) and
    /// should be quick (each fork waits for it). A panic in it is caught
    /// and the fork goes on. The last hook given wins.
    ///
    /// ```
    /// # use popen_pool::Registry;
    /// fn warm() { /* e.g. refresh a cache the workers read */ }
    /// let registry = Registry::new().before_fork(warm);
    /// # let _ = registry;
    /// ```
    #[must_use]
    pub fn before_fork(mut self, hook: fn()) -> Self {
        self.before_fork = Some(hook);
        self
    }

    pub(crate) fn before_fork_hook(&self) -> Option<fn()> {
        self.before_fork
    }

    /// The registered task names, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.handlers.keys().copied().collect();
        names.sort_unstable();
        names
    }

    pub(crate) fn get(&self, name: &str) -> Option<Handler> {
        self.handlers.get(name).map(|&(_, h)| h)
    }
}

fn handle<T: Task>(payload: &[u8], ctx: &mut WorkerContext) -> Result<Vec<u8>, TaskFailure> {
    let task: T = postcard::from_bytes(payload).map_err(|e| {
        TaskFailure::new("decode", format!("cannot decode task {:?}: {e}", T::NAME))
    })?;
    let output = task.run(ctx)?;
    crate::sererr::to_postcard(&output).map_err(|e| {
        TaskFailure::new("encode", format!("cannot encode output of {:?}: {e}", T::NAME))
    })
}

/// A task already serialized, with its name: what travels to the worker.
///
/// Built from a typed task with [`ErasedTask::new`], or from a name and
/// postcard bytes received from elsewhere with [`ErasedTask::from_raw`] (a
/// relay such as an RPC server that forwards calls it cannot type).
#[derive(Clone, PartialEq, Eq)]
pub struct ErasedTask {
    pub(crate) name: Cow<'static, str>,
    pub(crate) payload: bytes::Bytes,
}

impl fmt::Debug for ErasedTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ErasedTask")
            .field("name", &self.name)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

impl ErasedTask {
    /// Serializes a task.
    ///
    /// # Errors
    ///
    /// [`PoolError::Codec`](crate::PoolError::Codec) if the value cannot be serialized.
    pub fn new<T: Task>(task: &T) -> Result<Self, crate::PoolError> {
        let payload =
            crate::sererr::to_postcard(task).map_err(|message| crate::PoolError::Codec {
                message: format!("cannot encode task {:?}: {message}", T::NAME),
            })?;
        Ok(ErasedTask { name: Cow::Borrowed(T::NAME), payload: payload.into() })
    }

    /// A task named `name` whose postcard-encoded value is `payload`.
    pub fn from_raw(name: impl Into<Cow<'static, str>>, payload: impl Into<bytes::Bytes>) -> Self {
        ErasedTask { name: name.into(), payload: payload.into() }
    }

    /// The task's registered name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The postcard-encoded task value.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }
}
