//! Saved state that mirrors another crate's state type field by field.

/// Implements `From<&model>` for the saved type and back, copying each `saved <=> model` pair of
/// fields; fields only the saved type has are set from the expressions in its braces (e.g. its
/// format version). One list serves both directions, so they cannot drift apart.
macro_rules! mirror_state {
    (
        $saved:ty { $($extra:ident: $value:expr),* $(,)? } <=> $model:ty {
            $($ours:ident <=> $theirs:ident),+ $(,)?
        }
    ) => {
        impl From<&$model> for $saved {
            #[allow(clippy::clone_on_copy)]
            fn from(model: &$model) -> Self {
                Self {
                    $($extra: $value,)*
                    $($ours: model.$theirs.clone(),)+
                }
            }
        }

        impl From<&$saved> for $model {
            #[allow(clippy::clone_on_copy)]
            fn from(saved: &$saved) -> Self {
                Self {
                    $($theirs: saved.$ours.clone(),)+
                }
            }
        }
    };
}

pub(crate) use mirror_state;
