//! Typed messages over any [`Group`] (real corosync or in-memory): serde values encoded
//! with MessagePack (rmp-serde, named fields so that adding a field with a serde default
//! stays compatible).
//!
//! A message from a peer that does not decode is yielded as a
//! [`GroupError::Codec`] item naming the sender; the stream goes on. All other error
//! items come from the underlying group and end it.

use std::future::Future;
use std::io::Cursor;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{
    ConfChg, Delivery, Group, GroupError, GroupEvent, GroupSender, Member, Receipt, TotemConfChg,
};

/// Encodes a message for [`GroupSender::mcast`].
pub fn encode<M: Serialize>(msg: &M) -> Result<Vec<u8>, GroupError> {
    rmp_serde::to_vec_named(msg).map_err(|e| GroupError::Codec {
        op: "encode",
        detail: format!("{} : {e}", std::any::type_name::<M>()),
    })
}

/// Decodes a delivered message; the error names the sender. Trailing bytes are an error.
pub fn decode<M: DeserializeOwned>(delivery: &Delivery) -> Result<M, GroupError> {
    let malformed = |why: String| GroupError::Codec {
        op: "decode",
        detail: format!(
            "message of {} bytes from {} is not a valid {}: {why}",
            delivery.payload.len(),
            delivery.from,
            std::any::type_name::<M>()
        ),
    };
    let mut cursor = Cursor::new(delivery.payload.as_slice());
    let mut de = rmp_serde::Deserializer::new(&mut cursor);
    let msg = M::deserialize(&mut de).map_err(|e| malformed(e.to_string()))?;
    let used = cursor.position() as usize;
    if used != delivery.payload.len() {
        return Err(malformed(format!(
            "{} trailing bytes",
            delivery.payload.len() - used
        )));
    }
    Ok(msg)
}

/// Sends typed messages through any [`GroupSender`]. Cheap to clone.
pub struct TypedSender<S, M> {
    inner: S,
    _message: PhantomData<fn(&M)>,
}

impl<S: Clone, M> Clone for TypedSender<S, M> {
    fn clone(&self) -> Self {
        TypedSender {
            inner: self.inner.clone(),
            _message: PhantomData,
        }
    }
}

impl<S: GroupSender, M: Serialize> TypedSender<S, M> {
    /// Sends `M`s through `inner`.
    pub fn new(inner: S) -> Self {
        TypedSender {
            inner,
            _message: PhantomData,
        }
    }

    /// Multicasts `msg` in agreed order (see [`GroupSender::mcast`]; the [`Receipt`] tells
    /// whether it was delivered). The message is encoded before the returned future is
    /// first polled, so it need not outlive the call.
    pub fn send(
        &self,
        msg: &M,
    ) -> impl Future<Output = Result<Receipt, GroupError>> + Send + 'static {
        let encoded = encode(msg);
        let inner = self.inner.clone();
        async move { inner.mcast(encoded?).await }
    }

    /// The untyped sender underneath.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

/// A group event with decoded messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TypedEvent<M> {
    /// The group's membership changed.
    ConfChg(ConfChg),
    /// The totem membership changed.
    TotemConfChg(TotemConfChg),
    /// A message, decoded.
    Deliver {
        /// The sender.
        from: Member,
        /// The message.
        msg: M,
    },
}

/// Wraps a [`Group`] so its stream yields [`TypedEvent<M>`].
pub struct TypedGroup<G, M> {
    inner: G,
    _message: PhantomData<fn() -> M>,
}

impl<G: Group, M: Serialize + DeserializeOwned> TypedGroup<G, M> {
    /// Decodes the messages of `group` as `M`.
    pub fn new(group: G) -> Self {
        TypedGroup {
            inner: group,
            _message: PhantomData,
        }
    }

    /// This process's identity in the group.
    pub fn local(&self) -> Member {
        self.inner.local()
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        self.inner.name()
    }

    /// A typed sender for this group.
    pub fn sender(&self) -> TypedSender<G::Sender, M> {
        TypedSender::new(self.inner.sender())
    }

    /// Leaves the group (see [`Group::leave`]).
    pub fn leave(self) -> impl Future<Output = Result<(), GroupError>> + Send {
        self.inner.leave()
    }

    /// The untyped group underneath.
    pub fn into_inner(self) -> G {
        self.inner
    }
}

impl<G: Group, M: DeserializeOwned> Stream for TypedGroup<G, M> {
    type Item = Result<TypedEvent<M>, GroupError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(item) => item,
        };
        Poll::Ready(item.map(|event| {
            event.and_then(|event| match event {
                GroupEvent::ConfChg(c) => Ok(TypedEvent::ConfChg(c)),
                GroupEvent::TotemConfChg(t) => Ok(TypedEvent::TotemConfChg(t)),
                GroupEvent::Deliver(d) => {
                    decode(&d).map(|msg| TypedEvent::Deliver { from: d.from, msg })
                }
            })
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NodeId, RingId};
    use futures::StreamExt;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Msg {
        Hello { generation: u64, has_state: bool },
        Clients(Vec<String>),
    }

    fn from(node: u32) -> Member {
        Member {
            node: NodeId(node),
            pid: 100 + node,
        }
    }

    /// A scripted group: yields the given events, records what is sent.
    struct Script {
        events: VecDeque<Result<GroupEvent, GroupError>>,
        sent: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    #[derive(Clone)]
    struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

    impl GroupSender for Recorder {
        fn mcast(
            &self,
            payload: Vec<u8>,
        ) -> impl Future<Output = Result<Receipt, GroupError>> + Send {
            self.0.lock().unwrap().push(payload);
            // Nobody resolves it: these tests only look at what was sent.
            async { crate::inbox::Receipts::new("script").register(0) }
        }
    }

    impl Stream for Script {
        type Item = Result<GroupEvent, GroupError>;
        fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            Poll::Ready(self.events.pop_front())
        }
    }

    impl Group for Script {
        type Sender = Recorder;
        fn local(&self) -> Member {
            from(1)
        }
        fn name(&self) -> &str {
            "script"
        }
        fn sender(&self) -> Recorder {
            Recorder(Arc::clone(&self.sent))
        }
        async fn leave(self) -> Result<(), GroupError> {
            Ok(())
        }
    }

    #[test]
    fn round_trip_through_encode_decode() {
        let msg = Msg::Hello {
            generation: 7,
            has_state: true,
        };
        let payload = encode(&msg).unwrap();
        let back: Msg = decode(&Delivery {
            from: from(2),
            payload,
        })
        .unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn decode_errors_name_the_sender() {
        let garbage = Delivery {
            from: from(3),
            payload: vec![0xc1, 0xff, 0x00],
        };
        let err = decode::<Msg>(&garbage).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, GroupError::Codec { op: "decode", .. }));
        assert!(text.contains("from 3/103"), "{text}");
        assert!(text.contains("3 bytes"), "{text}");

        let mut trailing = encode(&Msg::Clients(vec!["a".into()])).unwrap();
        trailing.push(0);
        let err = decode::<Msg>(&Delivery {
            from: from(2),
            payload: trailing,
        })
        .unwrap_err();
        assert!(err.to_string().contains("1 trailing bytes"), "{err}");
    }

    #[tokio::test]
    async fn typed_stream_survives_a_malformed_message() {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let good = encode(&Msg::Clients(vec!["c1".into(), "c2".into()])).unwrap();
        let events = VecDeque::from(vec![
            Ok(GroupEvent::ConfChg(ConfChg {
                members: vec![from(1), from(2)],
                left: vec![],
                joined: vec![],
            })),
            Ok(GroupEvent::TotemConfChg(TotemConfChg {
                ring: RingId {
                    node: NodeId(1),
                    seq: 4,
                },
                members: vec![NodeId(1), NodeId(2)],
            })),
            Ok(GroupEvent::Deliver(Delivery {
                from: from(2),
                payload: b"not msgpack of Msg".to_vec(),
            })),
            Ok(GroupEvent::Deliver(Delivery {
                from: from(2),
                payload: good,
            })),
        ]);
        let mut group: TypedGroup<Script, Msg> = TypedGroup::new(Script {
            events,
            sent: Arc::clone(&sent),
        });
        assert!(matches!(
            group.next().await,
            Some(Ok(TypedEvent::ConfChg(_)))
        ));
        assert!(matches!(
            group.next().await,
            Some(Ok(TypedEvent::TotemConfChg(_)))
        ));
        match group.next().await {
            Some(Err(GroupError::Codec { detail, .. })) => assert!(detail.contains("2/102")),
            other => panic!("expected a codec error, got {other:?}"),
        }
        assert_eq!(
            group.next().await.unwrap().unwrap(),
            TypedEvent::Deliver {
                from: from(2),
                msg: Msg::Clients(vec!["c1".into(), "c2".into()])
            }
        );
        assert!(group.next().await.is_none());

        let sender = group.sender();
        let hello = Msg::Hello {
            generation: 1,
            has_state: false,
        };
        sender.send(&hello).await.unwrap();
        let recorded = sent.lock().unwrap().clone();
        assert_eq!(recorded.len(), 1);
        let back: Msg = decode(&Delivery {
            from: from(1),
            payload: recorded[0].clone(),
        })
        .unwrap();
        assert_eq!(back, hello);
    }
}
