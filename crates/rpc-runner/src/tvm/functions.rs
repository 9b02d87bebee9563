//! The TVM server's global functions a measurement uses, as
//! [`TvmSession`] methods: upload, load a module, look up its functions,
//! time them, remove files.

use super::args::{Device, RemoteFunc, RemoteModule, TvmValue};
use super::error::TvmError;
use super::options::TimeEvaluatorConfig;
use super::session::TvmSession;

impl TvmSession {
    /// Writes `data` to `path` in the session's temp dir on the server
    /// (`tvm.rpc.server.upload`).
    ///
    /// # Errors
    ///
    /// As [`call`](TvmSession::call).
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: a dropped call breaks the session (see [`TvmSession`]).
    pub async fn upload(&mut self, path: &str, data: &[u8]) -> Result<(), TvmError> {
        let f = self.cached_func("tvm.rpc.server.upload").await?;
        self.call(f, &[TvmValue::Str(path.to_owned()), TvmValue::Bytes(data.to_vec())]).await?;
        Ok(())
    }

    /// Loads the uploaded shared library `path` (`tvm.rpc.server.load_module`).
    ///
    /// # Errors
    ///
    /// [`TvmError::Remote`] if it cannot be loaded; as [`call`](TvmSession::call).
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: a dropped call breaks the session (see [`TvmSession`]).
    pub async fn load_module(&mut self, path: &str) -> Result<RemoteModule, TvmError> {
        let f = self.cached_func("tvm.rpc.server.load_module").await?;
        match self.call(f, &[TvmValue::Str(path.to_owned())]).await? {
            TvmValue::Module(m) => Ok(m),
            other => Err(self.fail(TvmError::protocol(format!("load_module returned {other:?}")))),
        }
    }

    /// The function `name` of `module` (`ffi.ModuleGetFunction`, imports
    /// included); free it with [`free_handle`](TvmSession::free_handle).
    ///
    /// # Errors
    ///
    /// [`TvmError::NoSuchFunction`] if the module lacks it; as [`call`](TvmSession::call).
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: a dropped call breaks the session (see [`TvmSession`]).
    pub async fn module_function(
        &mut self,
        module: RemoteModule,
        name: &str,
    ) -> Result<RemoteFunc, TvmError> {
        let f = self.cached_func("ffi.ModuleGetFunction").await?;
        let args = [TvmValue::Module(module), TvmValue::Str(name.to_owned()), TvmValue::Bool(true)];
        match self.call(f, &args).await? {
            TvmValue::Func(func) => Ok(func),
            TvmValue::None => Err(TvmError::NoSuchFunction { name: name.to_owned() }),
            other => Err(self.fail(TvmError::protocol(format!("module function is {other:?}")))),
        }
    }

    /// Removes `path` from the session's temp dir (`tvm.rpc.server.remove`).
    ///
    /// # Errors
    ///
    /// As [`call`](TvmSession::call).
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: a dropped call breaks the session (see [`TvmSession`]).
    pub async fn remove(&mut self, path: &str) -> Result<(), TvmError> {
        let f = self.cached_func("tvm.rpc.server.remove").await?;
        self.call(f, &[TvmValue::Str(path.to_owned())]).await.map(drop)
    }

    /// A timer of `module`'s function `name` on `device`
    /// (`runtime.RPCTimeEvaluator`): call it with [`time`](TvmSession::time).
    ///
    /// # Errors
    ///
    /// [`TvmError::Remote`] naming the function if the module lacks it; as
    /// [`call`](TvmSession::call).
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: a dropped call breaks the session (see [`TvmSession`]).
    pub async fn time_evaluator(
        &mut self,
        module: RemoteModule,
        name: &str,
        device: Device,
        cfg: &TimeEvaluatorConfig,
    ) -> Result<RemoteFunc, TvmError> {
        let f = self.cached_func("runtime.RPCTimeEvaluator").await?;
        let c = cfg;
        let args = [
            TvmValue::Module(module),
            TvmValue::Str(name.to_owned()),
            TvmValue::Int(device.device_type.into()),
            TvmValue::Int(device.device_id.into()),
            TvmValue::Int(c.number.into()),
            TvmValue::Int(c.repeat.into()),
            TvmValue::Int(c.min_repeat_ms.into()),
            TvmValue::Int(c.limit_zero_time_iterations.into()),
            TvmValue::Int(c.cooldown_interval_ms.into()),
            TvmValue::Int(c.repeats_to_cooldown.into()),
            TvmValue::Int(c.cache_flush_bytes.into()),
            TvmValue::Str(c.f_preproc.clone()),
        ];
        match self.call(f, &args).await? {
            TvmValue::Func(t) => Ok(t),
            other => Err(self.fail(TvmError::protocol(format!("time evaluator is {other:?}")))),
        }
    }

    /// Calls a timer from [`time_evaluator`](TvmSession::time_evaluator):
    /// the `repeat` costs in seconds.
    ///
    /// # Errors
    ///
    /// As [`call`](TvmSession::call); [`TvmError::Protocol`] if it did not
    /// return float64 costs.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: a dropped call breaks the session (see [`TvmSession`]).
    pub async fn time(
        &mut self,
        timer: RemoteFunc,
        args: &[TvmValue],
    ) -> Result<Vec<f64>, TvmError> {
        let v = self.call(timer, args).await?;
        v.as_f64s().ok_or_else(|| self.fail(TvmError::protocol(format!("timer returned {v:?}"))))
    }
}
