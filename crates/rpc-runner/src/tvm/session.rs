//! [`TvmSession`]: a session with one of TVM's own RPC servers.

use std::collections::HashMap;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::args::{
    DataType, Device, RemoteFunc, RemoteTensor, TvmValue, call_return, read_seq, write_seq,
    write_tensor,
};
use super::error::TvmError;
use super::options::TvmOptions;
use super::packet::{PROTOCOL_VERSION, Packet, PacketWriter, Reader, RpcCode, read_packet};
use crate::wire::handshake::{
    CODE_AT_CAPACITY, CODE_DUPLICATE, CODE_MISMATCH, CODE_UNAUTHORIZED, ClientHello,
    HandshakeFailure, client_handshake,
};

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Open,
    /// A request was sent and its reply not read to the end.
    InCall,
    Closed,
    Broken(String),
}

/// A session with one of TVM's own RPC servers (`python -m
/// tvm.exec.rpc_server`, the C++ `tvm_rpc`, TVM's Android app), TVM >= 0.21.
///
/// Its lifetime is explicit: [`close`](TvmSession::close) sends
/// `kShutdown`, waits until the server has closed the connection (TVM's
/// Python server then has ended the session's process and removed its
/// temp dir) and is idempotent. Dropping a session without closing it
/// closes its socket at once; the server's session process sees the end of
/// its stream and exits (after the call it is running, if any, returns),
/// freeing the device.
///
/// # Cancel safety
///
/// TVM's protocol has no way to cancel a call, so a method whose future is
/// dropped before its reply was read leaves the session **broken**: every
/// later call fails fast with [`TvmError::Broken`], never reads a stale
/// reply. Close or drop it (the server's process ends with the connection).
/// A call that exceeds [`TvmOptions::call_timeout`] ends the same way, with
/// [`TvmError::Timeout`]. Errors the server raised
/// ([`TvmError::Remote`], [`TvmError::NoSuchFunction`]) and refused
/// arguments ([`TvmError::InvalidArgument`]) leave it usable; every other
/// error breaks it.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(kernel: Vec<u8>) -> Result<(), rpc_runner::tvm::TvmError> {
/// use rpc_runner::tvm::{DataType, Device, TimeEvaluatorConfig, TvmOptions, TvmSession, TvmValue};
/// let mut sess = TvmSession::connect("127.0.0.1:9090", "", &TvmOptions::default()).await?;
/// sess.upload("add.so", &kernel).await?;
/// let module = sess.load_module("add.so").await?;
/// let dev = Device::cpu(0);
/// let timer =
///     sess.time_evaluator(module, "add", dev, &TimeEvaluatorConfig::new(10, 3, 0)).await?;
/// let x = sess.alloc(&[1024], DataType::FLOAT32, dev).await?;
/// let costs = sess.time(timer, &[TvmValue::Tensor(x.clone())]).await?;
/// assert_eq!(costs.len(), 3);
/// sess.free(&x).await?;
/// sess.close().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TvmSession {
    stream: Option<TcpStream>,
    state: State,
    addr: String,
    server_key: String,
    opts: TvmOptions,
    /// A reply has decoded (so the server speaks TVM >= 0.21's encoding).
    decoded_once: bool,
    /// Global functions looked up once per session.
    funcs: HashMap<&'static str, RemoteFunc>,
}

impl TvmSession {
    /// Connects to the TVM RPC server at `addr` (`host:port`) with its match
    /// key (without a tracker: the server's `--key`), then initialises the
    /// remote session (`kInitServer` with the protocol version).
    ///
    /// # Errors
    ///
    /// [`TvmError::Connect`], [`TvmError::KeyMismatch`],
    /// [`TvmError::Handshake`], [`TvmError::Timeout`], and
    /// [`TvmError::Incompatible`] if the server's reply does not decode (an
    /// older TVM, or not a TVM server).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the half-open connection; the server's
    /// session ends with it.
    pub async fn connect(
        addr: &str,
        matchkey: &str,
        opts: &TvmOptions,
    ) -> Result<TvmSession, TvmError> {
        let limit = opts.connect_timeout;
        tokio::time::timeout(limit, Self::connect_inner(addr, matchkey, opts))
            .await
            .map_err(|_| TvmError::Timeout { what: "connecting to the TVM RPC server", limit })?
    }

    async fn connect_inner(
        addr: &str,
        matchkey: &str,
        opts: &TvmOptions,
    ) -> Result<TvmSession, TvmError> {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|source| TvmError::Connect { addr: addr.to_owned(), source })?;
        let _ = stream.set_nodelay(true);
        let hello = ClientHello {
            matchkey: matchkey.to_owned(),
            timeout: opts.session_timeout,
            token: None,
        };
        let server_key = match client_handshake(&mut stream, &hello).await {
            Ok(key) => key,
            Err(HandshakeFailure::Io(e)) => {
                return Err(TvmError::Handshake {
                    message: format!("{e} (is {addr} an RPC server?)"),
                });
            }
            Err(HandshakeFailure::Refused(CODE_MISMATCH)) => {
                return Err(TvmError::KeyMismatch { matchkey: matchkey.to_owned() });
            }
            Err(HandshakeFailure::Refused(code)) => {
                let why = match code {
                    CODE_DUPLICATE => "busy with another session".to_owned(),
                    CODE_UNAUTHORIZED => "token refused".to_owned(),
                    CODE_AT_CAPACITY => "at its connection limit".to_owned(),
                    other => format!("unexpected answer {other:#x}"),
                };
                return Err(TvmError::Handshake { message: why });
            }
        };
        let mut sess = TvmSession {
            stream: Some(stream),
            state: State::Open,
            addr: addr.to_owned(),
            server_key,
            opts: opts.clone(),
            decoded_once: false,
            funcs: HashMap::new(),
        };
        let mut w = PacketWriter::new(RpcCode::InitServer);
        w.blob(PROTOCOL_VERSION.as_bytes());
        write_seq(&mut w, &[])?;
        let ret = sess.request(w.finish(), "initialising the session", false, read_seq).await?;
        match ret.as_slice() {
            [TvmValue::None] => Ok(sess),
            other => Err(sess.fail(TvmError::Incompatible {
                detail: format!("kInitServer answered {other:?}, not a void return"),
                tvm_framing: true,
            })),
        }
    }

    /// The address of the server.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The server's key from the handshake (`server:<key>` without the prefix).
    pub fn server_key(&self) -> &str {
        &self.server_key
    }

    /// The RPC protocol version both sides agreed on (TVM's `kRPCProtocolVer`).
    pub fn protocol_version(&self) -> &'static str {
        PROTOCOL_VERSION
    }

    /// True until the session is closed or broken.
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    pub(super) fn fail(&mut self, e: TvmError) -> TvmError {
        if e.breaks_session() && self.state != State::Closed {
            self.state = State::Broken(e.to_string());
        }
        e
    }

    fn check_open(&self) -> Result<(), TvmError> {
        match &self.state {
            State::Open => Ok(()),
            State::Closed => Err(TvmError::Closed),
            State::InCall => Err(TvmError::Broken {
                reason: "an earlier call was cancelled before its reply was read".into(),
            }),
            State::Broken(reason) => Err(TvmError::Broken { reason: reason.clone() }),
        }
    }

    /// Sends one request packet and reads its reply (`kReturn`, or
    /// `kCopyAck` if `copy_ack`), decoded by `decode`.
    async fn request<T>(
        &mut self,
        packet: Vec<u8>,
        what: &'static str,
        copy_ack: bool,
        decode: impl FnOnce(&mut Reader<'_>) -> Result<T, TvmError>,
    ) -> Result<T, TvmError> {
        self.check_open()?;
        let Some(stream) = self.stream.as_mut() else { return Err(TvmError::Closed) };
        self.state = State::InCall;
        let (limit, max) = (self.opts.call_timeout, self.opts.max_packet_bytes);
        let exchange = async {
            stream.write_all(&packet).await?;
            read_packet(stream, max).await
        };
        let packet: Packet = match tokio::time::timeout(limit, exchange).await {
            Err(_) => return Err(self.fail(TvmError::Timeout { what, limit })),
            Ok(Err(source)) => return Err(self.fail(TvmError::ConnectionLost { what, source })),
            // A first reply that announces an absurd length is not TVM's
            // encoding either (our own server's frames, for one).
            Ok(Ok(Err(e))) if !self.decoded_once => {
                let detail = e.to_string();
                return Err(self.fail(TvmError::Incompatible { detail, tvm_framing: false }));
            }
            Ok(Ok(Err(e))) => return Err(self.fail(e)),
            Ok(Ok(Ok(p))) => p,
        };
        let mut r = Reader::new(&packet.body);
        let decoded = match packet.code {
            c if c == RpcCode::Return as i32 && !copy_ack => decode(&mut r),
            c if c == RpcCode::CopyAck as i32 && copy_ack => decode(&mut r),
            c if c == RpcCode::Exception as i32 => match read_seq(&mut r) {
                Ok(v) => match <[TvmValue; 1]>::try_from(v) {
                    Ok([TvmValue::Str(message)]) => {
                        self.decoded_once = true;
                        self.state = State::Open;
                        return Err(self.fail(if message.starts_with("RPCSessionTimeoutError") {
                            TvmError::SessionTimeout { message }
                        } else {
                            TvmError::Remote { message }
                        }));
                    }
                    other => Err(TvmError::protocol(format!("exception carries {other:?}"))),
                },
                Err(e) => Err(e),
            },
            other => Err(TvmError::protocol(format!("unexpected RPC code {other} while {what}"))),
        };
        match decoded.and_then(|v| r.finish(what).map(|()| v)) {
            Ok(v) => {
                self.decoded_once = true;
                self.state = State::Open;
                Ok(v)
            }
            Err(e) if !self.decoded_once => {
                let detail = e.to_string();
                Err(self.fail(TvmError::Incompatible { detail, tvm_framing: true }))
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// A syscall (`kGetGlobalFunc`, `kDev*`, `kFreeHandle`): its one value.
    async fn syscall(
        &mut self,
        code: RpcCode,
        args: &[TvmValue],
        what: &'static str,
    ) -> Result<TvmValue, TvmError> {
        let mut w = PacketWriter::new(code);
        write_seq(&mut w, args)?;
        let mut values = self.request(w.finish(), what, false, read_seq).await?;
        match values.len() {
            1 => Ok(values.remove(0)),
            n => Err(self.fail(TvmError::protocol(format!("{what}: {n} return values, not 1")))),
        }
    }

    /// Looks up the server's global function `name` (`kGetGlobalFunc`).
    ///
    /// # Errors
    ///
    /// [`TvmError::NoSuchFunction`]; connection errors as for every call.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: a dropped call breaks the session (see [`TvmSession`]).
    pub async fn get_global_func(&mut self, name: &str) -> Result<RemoteFunc, TvmError> {
        let v = self
            .syscall(
                RpcCode::GetGlobalFunc,
                &[TvmValue::Str(name.to_owned())],
                "getting a function",
            )
            .await?;
        match v {
            TvmValue::OpaquePtr(h) | TvmValue::Func(RemoteFunc(h)) if h != 0 => Ok(RemoteFunc(h)),
            TvmValue::None | TvmValue::OpaquePtr(0) => {
                Err(TvmError::NoSuchFunction { name: name.to_owned() })
            }
            other => Err(self.fail(TvmError::protocol(format!("function handle is {other:?}")))),
        }
    }

    pub(super) async fn cached_func(&mut self, name: &'static str) -> Result<RemoteFunc, TvmError> {
        if let Some(f) = self.funcs.get(name) {
            return Ok(*f);
        }
        let f = self.get_global_func(name).await?;
        self.funcs.insert(name, f);
        Ok(f)
    }

    /// Calls `func` with `args` (`kCallFunc`) and returns its value
    /// (functions and modules as handles, bytes and strings by value).
    ///
    /// # Errors
    ///
    /// [`TvmError::Remote`] if the function raised; [`TvmError::Timeout`]
    /// after [`TvmOptions::call_timeout`]; [`TvmError::SessionTimeout`];
    /// [`TvmError::ConnectionLost`] if the server died.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: a dropped call breaks the session (see [`TvmSession`]).
    pub async fn call(
        &mut self,
        func: RemoteFunc,
        args: &[TvmValue],
    ) -> Result<TvmValue, TvmError> {
        let mut w = PacketWriter::new(RpcCode::CallFunc);
        w.u64(func.0);
        write_seq(&mut w, args)?;
        let values = self.request(w.finish(), "calling a function", false, read_seq).await?;
        call_return(values).map_err(|e| self.fail(e))
    }

    /// Frees a handle the server gave out (`kFreeHandle`): a function, a
    /// module or another object.
    ///
    /// # Errors
    ///
    /// As [`call`](TvmSession::call).
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: a dropped call breaks the session (see [`TvmSession`]).
    pub async fn free_handle(&mut self, handle: u64) -> Result<(), TvmError> {
        self.funcs.retain(|_, f| f.0 != handle);
        self.syscall(RpcCode::FreeHandle, &[TvmValue::OpaquePtr(handle)], "freeing a handle")
            .await
            .map(drop)
    }

    /// Allocates a contiguous tensor on `device` (`kDevAllocDataWithScope`).
    ///
    /// # Errors
    ///
    /// [`TvmError::InvalidArgument`] for a negative or overflowing shape;
    /// [`TvmError::Remote`] if the server cannot allocate; as [`call`](TvmSession::call).
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: a dropped call breaks the session (see [`TvmSession`]).
    pub async fn alloc(
        &mut self,
        shape: &[i64],
        dtype: DataType,
        device: Device,
    ) -> Result<RemoteTensor, TvmError> {
        let mut t = RemoteTensor { data: 0, device, dtype, shape: shape.to_vec(), byte_offset: 0 };
        if t.nbytes().is_none() {
            return Err(TvmError::InvalidArgument { message: format!("bad shape {shape:?}") });
        }
        let args = [TvmValue::Tensor(t.clone()), TvmValue::None];
        match self.syscall(RpcCode::DevAllocDataWithScope, &args, "allocating a tensor").await? {
            TvmValue::OpaquePtr(p) if p != 0 => {
                t.data = p;
                Ok(t)
            }
            other => Err(self.fail(TvmError::protocol(format!("allocation returned {other:?}")))),
        }
    }

    /// Frees a tensor from [`alloc`](TvmSession::alloc) (`kDevFreeData`).
    ///
    /// # Errors
    ///
    /// As [`call`](TvmSession::call).
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: a dropped call breaks the session (see [`TvmSession`]).
    pub async fn free(&mut self, tensor: &RemoteTensor) -> Result<(), TvmError> {
        let args = [TvmValue::Device(tensor.device), TvmValue::OpaquePtr(tensor.data)];
        self.syscall(RpcCode::DevFreeData, &args, "freeing a tensor").await.map(drop)
    }

    fn tensor_bytes(tensor: &RemoteTensor) -> Result<u64, TvmError> {
        tensor.nbytes().ok_or_else(|| TvmError::InvalidArgument {
            message: format!("bad shape {:?}", tensor.shape),
        })
    }

    /// Fills `tensor` with `data` (`kCopyToRemote`); `data` must be exactly
    /// its size.
    ///
    /// # Errors
    ///
    /// [`TvmError::InvalidArgument`] if the sizes differ; as [`call`](TvmSession::call).
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: a dropped call breaks the session (see [`TvmSession`]).
    pub async fn copy_to_remote(
        &mut self,
        tensor: &RemoteTensor,
        data: &[u8],
    ) -> Result<(), TvmError> {
        let n = Self::tensor_bytes(tensor)?;
        if n != data.len() as u64 {
            return Err(TvmError::InvalidArgument {
                message: format!("{} bytes for a tensor of {n} bytes", data.len()),
            });
        }
        let mut w = PacketWriter::new(RpcCode::CopyToRemote);
        write_tensor(&mut w, tensor)?;
        w.blob(data);
        let ret = self.request(w.finish(), "copying to the server", false, read_seq).await?;
        match ret.as_slice() {
            [TvmValue::None] => Ok(()),
            other => Err(self.fail(TvmError::protocol(format!("copy answered {other:?}")))),
        }
    }

    /// Reads `tensor`'s bytes back (`kCopyFromRemote`).
    ///
    /// # Errors
    ///
    /// [`TvmError::PacketTooLarge`] if it exceeds
    /// [`TvmOptions::max_packet_bytes`] (checked before asking); as [`call`](TvmSession::call).
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: a dropped call breaks the session (see [`TvmSession`]).
    pub async fn copy_from_remote(&mut self, tensor: &RemoteTensor) -> Result<Vec<u8>, TvmError> {
        let n = Self::tensor_bytes(tensor)?;
        if n.saturating_add(4) > self.opts.max_packet_bytes {
            return Err(TvmError::PacketTooLarge { len: n, limit: self.opts.max_packet_bytes });
        }
        let mut w = PacketWriter::new(RpcCode::CopyFromRemote);
        write_tensor(&mut w, tensor)?;
        w.u64(n);
        self.request(w.finish(), "copying from the server", true, |r| {
            Ok(r.take(n, "copied data")?.to_vec())
        })
        .await
    }

    /// A device attribute (`kDevGetAttr`; `kind` is TVM's `DeviceAttrKind`:
    /// 0 exist, 1 max threads per block, 2 warp size, 5 device name, ...).
    /// An attribute the device does not have is [`TvmValue::None`].
    ///
    /// # Errors
    ///
    /// As [`call`](TvmSession::call).
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: a dropped call breaks the session (see [`TvmSession`]).
    pub async fn device_attr(&mut self, device: Device, kind: i32) -> Result<TvmValue, TvmError> {
        let args = [TvmValue::Device(device), TvmValue::Int(kind.into())];
        self.syscall(RpcCode::DevGetAttr, &args, "reading a device attribute").await
    }

    /// Ends the session: sends `kShutdown` and waits (up to
    /// [`TvmOptions::connect_timeout`]) until the server closes the
    /// connection, i.e. has ended the session. Idempotent; on a broken
    /// session it only drops the connection.
    ///
    /// # Errors
    ///
    /// [`TvmError::Timeout`] if the server does not close in time (the
    /// connection is dropped anyway); [`TvmError::ConnectionLost`] if the
    /// shutdown could not be sent.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a dropped `close` leaves the session closed, its
    /// connection dropped when the session is.
    pub async fn close(&mut self) -> Result<(), TvmError> {
        let was_open = self.state == State::Open;
        self.state = State::Closed;
        let Some(mut stream) = self.stream.take() else { return Ok(()) };
        if !was_open {
            return Ok(());
        }
        let limit = self.opts.connect_timeout;
        let shutdown = async {
            stream.write_all(&PacketWriter::new(RpcCode::Shutdown).finish()).await?;
            // Anything the server still sends is skipped until it closes.
            let mut sink = [0u8; 4096];
            while stream.read(&mut sink).await? != 0 {}
            Ok::<_, std::io::Error>(())
        };
        match tokio::time::timeout(limit, shutdown).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Ok(Err(source)) => {
                Err(TvmError::ConnectionLost { what: "closing the session", source })
            }
            Err(_) => {
                Err(TvmError::Timeout { what: "waiting for the server to end the session", limit })
            }
        }
    }
}
