//! Batch errors: each code maps itself to its HTTP status and Azure's message. The wire layer only
//! renders them (BatchError JSON, docs/contract.md §3).

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    InvalidRequestBody,
    MissingRequiredProperty,
    InvalidPropertyValue,
    MissingRequiredQueryParameter,
    InvalidQueryParameterValue,
    OutOfRangeQueryParameterValue,
    UnsupportedQueryParameter,
    UnsupportedRequestVersion,
    InvalidHeaderValue,
    MissingRequiredHeader,
    InvalidUri,
    InvalidAuthenticationInfo,
    /// No credentials at all: 401.
    AuthenticationRequired,
    /// Credentials present but wrong: 403.
    AuthenticationFailed,
    PoolNotFound,
    NodeNotFound,
    NodeUserNotFound,
    /// A bluebatch resource (join token, host) that does not exist: 404.
    ResourceNotFound,
    UnsupportedHttpVerb,
    PoolExists,
    PoolBeingDeleted,
    PoolBeingResized,
    NodeUserExists,
    NodeBeingCreated,
    NodeBeingStarted,
    NodeBeingRebooted,
    NodeBeingReimaged,
    NodeStateUnusable,
    OperationInvalidForCurrentState,
    NodeAlreadyInTargetSchedulingState,
    OperationNotValidOnPool,
    OperationNotValidOnNode,
    ConditionNotMet,
    RequestBodyTooLarge,
    OperationTimedOut,
    InternalError,
    /// An operation of the published Batch API that bluebatch does not serve: 501.
    NotImplemented,
    ServerBusy,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::AuthenticationRequired => "AuthenticationFailed",
            other => other.name(),
        }
    }

    fn name(self) -> &'static str {
        use Code::*;
        match self {
            InvalidRequestBody => "InvalidRequestBody",
            MissingRequiredProperty => "MissingRequiredProperty",
            InvalidPropertyValue => "InvalidPropertyValue",
            MissingRequiredQueryParameter => "MissingRequiredQueryParameter",
            InvalidQueryParameterValue => "InvalidQueryParameterValue",
            OutOfRangeQueryParameterValue => "OutOfRangeQueryParameterValue",
            UnsupportedQueryParameter => "UnsupportedQueryParameter",
            UnsupportedRequestVersion => "UnsupportedRequestVersion",
            InvalidHeaderValue => "InvalidHeaderValue",
            MissingRequiredHeader => "MissingRequiredHeader",
            InvalidUri => "InvalidUri",
            InvalidAuthenticationInfo => "InvalidAuthenticationInfo",
            AuthenticationRequired | AuthenticationFailed => "AuthenticationFailed",
            PoolNotFound => "PoolNotFound",
            NodeNotFound => "NodeNotFound",
            NodeUserNotFound => "NodeUserNotFound",
            ResourceNotFound => "ResourceNotFound",
            UnsupportedHttpVerb => "UnsupportedHttpVerb",
            PoolExists => "PoolExists",
            PoolBeingDeleted => "PoolBeingDeleted",
            PoolBeingResized => "PoolBeingResized",
            NodeUserExists => "NodeUserExists",
            NodeBeingCreated => "NodeBeingCreated",
            NodeBeingStarted => "NodeBeingStarted",
            NodeBeingRebooted => "NodeBeingRebooted",
            NodeBeingReimaged => "NodeBeingReimaged",
            NodeStateUnusable => "NodeStateUnusable",
            OperationInvalidForCurrentState => "OperationInvalidForCurrentState",
            NodeAlreadyInTargetSchedulingState => "NodeAlreadyInTargetSchedulingState",
            OperationNotValidOnPool => "OperationNotValidOnPool",
            OperationNotValidOnNode => "OperationNotValidOnNode",
            ConditionNotMet => "ConditionNotMet",
            RequestBodyTooLarge => "RequestBodyTooLarge",
            OperationTimedOut => "OperationTimedOut",
            InternalError => "InternalError",
            NotImplemented => "NotImplemented",
            ServerBusy => "ServerBusy",
        }
    }

    pub fn status(self) -> u16 {
        use Code::*;
        match self {
            InvalidRequestBody
            | MissingRequiredProperty
            | InvalidPropertyValue
            | MissingRequiredQueryParameter
            | InvalidQueryParameterValue
            | OutOfRangeQueryParameterValue
            | UnsupportedQueryParameter
            | UnsupportedRequestVersion
            | InvalidHeaderValue
            | MissingRequiredHeader
            | InvalidUri
            | InvalidAuthenticationInfo => 400,
            AuthenticationRequired => 401,
            AuthenticationFailed => 403,
            PoolNotFound | NodeNotFound | NodeUserNotFound | ResourceNotFound => 404,
            UnsupportedHttpVerb => 405,
            PoolExists
            | PoolBeingDeleted
            | PoolBeingResized
            | NodeUserExists
            | NodeBeingCreated
            | NodeBeingStarted
            | NodeBeingRebooted
            | NodeBeingReimaged
            | NodeStateUnusable
            | OperationInvalidForCurrentState
            | NodeAlreadyInTargetSchedulingState
            | OperationNotValidOnPool
            | OperationNotValidOnNode => 409,
            ConditionNotMet => 412,
            RequestBodyTooLarge => 413,
            OperationTimedOut | InternalError => 500,
            NotImplemented => 501,
            ServerBusy => 503,
        }
    }

    /// Azure's message for the code (the first line of `message.value`).
    pub fn default_message(self) -> &'static str {
        use Code::*;
        match self {
            InvalidRequestBody => "The specified Request Body is not syntactically valid.",
            MissingRequiredProperty => "A required property was not specified in the request body.",
            InvalidPropertyValue => {
                "The value provided for one of the properties in the request body is invalid."
            }
            MissingRequiredQueryParameter => {
                "A query parameter that's mandatory for this request is not specified."
            }
            InvalidQueryParameterValue => {
                "Value for one of the query parameters specified in the request URI is invalid."
            }
            OutOfRangeQueryParameterValue => {
                "One of the query parameters specified in the request URI is outside the permissible range."
            }
            UnsupportedQueryParameter => {
                "One of the query parameters specified in the request URI is not supported."
            }
            UnsupportedRequestVersion => "The specified api-version is not supported.",
            InvalidHeaderValue => {
                "The value for one of the HTTP headers is not in the correct format."
            }
            MissingRequiredHeader => {
                "A HTTP header that's mandatory for this request is not specified."
            }
            InvalidUri => "The requested URI does not represent any resource on the server.",
            InvalidAuthenticationInfo => {
                "The authentication information was not provided in the correct format. Verify the value of Authorization header."
            }
            AuthenticationRequired | AuthenticationFailed => {
                "Server failed to authenticate the request. Make sure the value of Authorization header is formed correctly including the signature."
            }
            PoolNotFound => "The specified pool does not exist.",
            NodeNotFound => "The specified node does not exist.",
            NodeUserNotFound => "The node user does not exist.",
            ResourceNotFound => "The specified resource does not exist.",
            UnsupportedHttpVerb => "The resource doesn't support the specified HTTP verb.",
            PoolExists => "The specified pool already exists.",
            PoolBeingDeleted => {
                "The specified pool has been marked for deletion and is being reclaimed."
            }
            PoolBeingResized => "The specified pool is currently being resized.",
            NodeUserExists => "The specified node user already exists.",
            NodeBeingCreated => "The specified node is being created.",
            NodeBeingStarted => "The specified node is being started.",
            NodeBeingRebooted => "The specified node is being rebooted.",
            NodeBeingReimaged => "The specified node is being reimaged.",
            NodeStateUnusable => "The specified node is in an unusable state.",
            OperationInvalidForCurrentState => {
                "The operation is not allowed in the current state of the node."
            }
            NodeAlreadyInTargetSchedulingState => {
                "The node is already in the target scheduling state."
            }
            OperationNotValidOnPool => "The operation is not valid on the specified pool.",
            OperationNotValidOnNode => "The operation is not valid on the specified node.",
            ConditionNotMet => {
                "The condition specified using HTTP conditional header(s) is not met."
            }
            RequestBodyTooLarge => {
                "The request body is too large and exceeds the maximum permissible limit."
            }
            OperationTimedOut => "The operation could not be completed within the permitted time.",
            InternalError => {
                "Server encountered an internal error. Please try again after some time."
            }
            NotImplemented => "The requested operation is not served by bluebatch.",
            ServerBusy => "Server is busy. Please retry the request later.",
        }
    }
}

/// A Batch error: code, optional extra message text and the `values` details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchError {
    pub code: Code,
    /// Replaces the default message when set.
    pub message: Option<String>,
    pub values: Vec<(String, String)>,
}

impl BatchError {
    pub fn new(code: Code) -> Self {
        Self {
            code,
            message: None,
            values: Vec::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<String>) -> Self {
        self.values.push((key.to_string(), value.into()));
        self
    }

    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    pub fn status(&self) -> u16 {
        self.code.status()
    }

    pub fn text(&self) -> &str {
        self.message
            .as_deref()
            .unwrap_or_else(|| self.code.default_message())
    }

    // Shorthands for the common shapes.
    pub fn property(code: Code, property: &str, reason: impl Into<String>) -> Self {
        Self::new(code)
            .with("PropertyName", property)
            .with("Reason", reason)
    }

    pub fn bad_body(reason: impl Into<String>) -> Self {
        Self::new(Code::InvalidRequestBody).with("Reason", reason)
    }

    pub fn missing(property: &str) -> Self {
        Self::new(Code::MissingRequiredProperty).with("PropertyName", property)
    }
}

impl From<Code> for BatchError {
    fn from(code: Code) -> Self {
        Self::new(code)
    }
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.text())
    }
}

impl std::error::Error for BatchError {}

pub type Result<T, E = BatchError> = std::result::Result<T, E>;
