//! [`Batch`]: the stream of `(index, result)` that runners and the builder
//! return.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, Stream};
use tokio_util::sync::{CancellationToken, DropGuard};

/// The results of a batch of measurements or builds, each as soon as it is
/// ready (completion order), with its index in the batch's inputs. Every
/// index comes exactly once; then the stream ends.
///
/// **Dropping the stream cancels the work it still owns**: measurements not
/// yet finished are cancelled (their sessions closed by the pipeline's
/// `cleanup`, their devices freed), builds not yet finished are killed. To
/// let a batch finish in the background, keep polling it (e.g. from a
/// spawned task). This is tokio's `JoinSet` rule, applied to a batch.
///
/// # Examples
///
/// See [`Runner::run`](super::Runner::run) and
/// [`LocalBuilder::build`](super::LocalBuilder::build).
#[must_use = "a batch is cancelled when dropped"]
pub struct Batch<R> {
    pending: FuturesUnordered<BoxFuture<'static, (usize, R)>>,
    len: usize,
    _cancel: DropGuard,
}

impl<R> fmt::Debug for Batch<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("len", &self.len)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl<R: Send + 'static> Batch<R> {
    /// A batch of `futures`, one per input in order; `cancel` is cancelled
    /// when the batch is dropped.
    pub(crate) fn new(
        futures: impl IntoIterator<Item = BoxFuture<'static, R>>,
        cancel: CancellationToken,
    ) -> Self {
        let pending: FuturesUnordered<_> = futures
            .into_iter()
            .enumerate()
            .map(|(i, f)| -> BoxFuture<'static, (usize, R)> {
                Box::pin(async move { (i, f.await) })
            })
            .collect();
        Batch { len: pending.len(), pending, _cancel: cancel.drop_guard() }
    }

    /// How many inputs the batch has (finished ones included).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the batch has no inputs.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Waits for every result; returns them in input order.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the batch, which cancels what is unfinished.
    pub async fn collect_ordered(mut self) -> Vec<R> {
        use futures::StreamExt as _;
        let mut slots: Vec<Option<R>> = (0..self.len).map(|_| None).collect();
        while let Some((i, r)) = self.next().await {
            slots[i] = Some(r);
        }
        slots.into_iter().flatten().collect()
    }
}

impl<R> Stream for Batch<R> {
    type Item = (usize, R);

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<(usize, R)>> {
        Pin::new(&mut self.pending).poll_next(cx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.pending.len(), Some(self.pending.len()))
    }
}
